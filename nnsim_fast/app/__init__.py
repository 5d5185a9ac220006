"""The application: the ``nnsim-fast`` command (``compare``, ``demo``, ``bench``) and the demo.

Everything here is built on the library's public API; nothing in the library imports this
package, so the core can be read, tested and changed without it.

``cli``       the argument parser and ``main`` (the console entry point)
``compare``   ``nnsim-fast compare``: sketch your models on your inputs, write the matrices
``inputs``    reading and checking what users pass (model factories, weights, data, outputs)
``bench``     ``nnsim-fast bench``: the benchmark harness of a source checkout
``demo``      ``nnsim-fast demo``: the seed paper's experiments, one function per stage
"""
