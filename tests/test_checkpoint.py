"""Resumable runs: ``sketch_model(..., checkpoint=path, checkpoint_every=K)``.

A crash is a real one: a job script runs ``sketch_model`` in a subprocess
whose model sends itself SIGKILL in the forward pass of a chosen batch (or in
the middle of writing a checkpoint).  The references are runs of the same
job in this process without interruption and without any checkpoint, so
resuming must reproduce them (float64, to 1e-12), the partial checkpoint must
hold exactly the rows of the batches it claims, and the skipped batches must
not run through the model again.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap
from types import ModuleType

import numpy as np
import pytest
import torch

from conftest import assert_same_representation

import nnsim_fast
from nnsim_fast import Representation, sketch_model

TOL = dict(rtol=1e-12, atol=1e-12)
SUBPROCESS_TIMEOUT_S = 60

JOB_SCRIPT = textwrap.dedent('''
    """A deterministic sketching job that can be killed at a chosen batch."""
    import os
    import signal
    import sys

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from nnsim_fast import IndexedDataset, sketch_model

    N, BATCH = 37, 5           # 8 batches, the last one of 2 rows
    LAYERS = ["fc1", "fc2"]
    SETTINGS = dict(layers=LAYERS, m=16, seed=5, dtype=torch.float64, progress=False)


    class Net(nn.Module):
        def __init__(self, kill_at=None):
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.act = nn.Tanh()
            self.fc2 = nn.Linear(8, 5)
            self.head = nn.Linear(5, 3)
            self.calls = 0
            self.kill_at = kill_at

        def forward(self, x):
            if self.kill_at is not None and self.calls == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            self.calls += 1
            return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


    def make_model(kill_at=None):
        torch.manual_seed(8)
        return Net(kill_at).double()


    def make_loader(indexed=False):
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(N, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (N,), generator=gen)
        if indexed:
            # A shuffled loader whose order is the same in every process and every call.
            return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=BATCH, shuffle=True,
                              generator=torch.Generator().manual_seed(10))
        return DataLoader(TensorDataset(x, y), batch_size=BATCH)


    def kill_during_save(at_save):
        """Make the at_save-th checkpoint write die half way through its data."""
        from nnsim_fast import storage
        real = storage.write_tensors
        count = [0]

        def dying_write(path, tensors, metadata):
            count[0] += 1
            if count[0] == at_save:
                real_bytes = storage._raw_bytes
                written = [0]

                def die_on_second_tensor(tensor):
                    written[0] += 1
                    if written[0] == 2:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real_bytes(tensor)

                storage._raw_bytes = die_on_second_tensor
            real(path, tensors, metadata)

        storage.write_tensors = dying_write


    if __name__ == "__main__":
        torch.set_num_threads(1)
        checkpoint, out = sys.argv[1], sys.argv[2]
        kill_at = os.environ.get("SKETCH_KILL_AT_BATCH")
        if os.environ.get("SKETCH_KILL_AT_SAVE"):
            kill_during_save(int(os.environ["SKETCH_KILL_AT_SAVE"]))
        model = make_model(None if kill_at is None else int(kill_at))
        rep = sketch_model(model, make_loader(), checkpoint=checkpoint, checkpoint_every=2,
                           **SETTINGS)
        rep.save(out)
        with open(out + ".calls", "w") as handle:
            handle.write(str(model.calls))
''')


@pytest.fixture
def job(tmp_path) -> ModuleType:
    path = tmp_path / "sketch_job.py"
    path.write_text(JOB_SCRIPT)
    spec = importlib.util.spec_from_file_location("sketch_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.path = path
    return module


def run_job(job: ModuleType, checkpoint: pathlib.Path, out: pathlib.Path,
               **env: str) -> subprocess.CompletedProcess:
    package_root = pathlib.Path(nnsim_fast.__file__).resolve().parent.parent
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SKETCH_KILL")}
    search_path = [str(package_root)]
    if environment.get("PYTHONPATH"):
        search_path.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(search_path)
    environment.update(env)
    return subprocess.run([sys.executable, str(job.path), str(checkpoint), str(out)],
                          env=environment, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)


def reference(job: ModuleType, **kwargs) -> Representation:
    """The same job in this process, uninterrupted and without a checkpoint."""
    return sketch_model(job.make_model(), job.make_loader(kwargs.pop("indexed", False)),
                        **job.SETTINGS, **kwargs)


def assert_same(a: Representation, b: Representation, tol=TOL) -> None:
    assert_same_representation(a, b, **tol)


def leftover_temporaries(directory: pathlib.Path) -> list:
    return sorted(p.name for p in directory.iterdir()
                  if p.name.endswith((".tmp", "partial")))


# --------------------------------------------------------------------------- crash and resume

def test_killed_run_resumes_to_the_uninterrupted_result(job, tmp_path):
    checkpoint, out = tmp_path / "run.ckpt", tmp_path / "result.safetensors"
    killed = run_job(job, checkpoint, out, SKETCH_KILL_AT_BATCH="5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()

    # Checkpoints were due after batches 2 and 4; batch 5 (0-based) never finished.
    partial = Representation.load(checkpoint)
    assert partial.meta["progress"]["batches"] == 4
    assert partial.meta["progress"]["complete"] is False
    assert partial.n == 4 * job.BATCH
    assert_same(reference(job, max_batches=4), partial)
    assert leftover_temporaries(tmp_path) == []

    resumed = run_job(job, checkpoint, out)
    assert resumed.returncode == 0, resumed.stderr
    result = Representation.load(out)
    assert result.n == job.N
    assert_same(reference(job), result)
    # Only the 4 batches after the checkpoint went through the model.
    assert (tmp_path / "result.safetensors.calls").read_text() == "4"
    final = Representation.load(checkpoint)
    assert final.meta["progress"] == {**partial.meta["progress"], "batches": 8, "complete": True}
    assert leftover_temporaries(tmp_path) == []


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(job, tmp_path):
    checkpoint, out = tmp_path / "run.ckpt", tmp_path / "result.safetensors"
    killed = run_job(job, checkpoint, out, SKETCH_KILL_AT_SAVE="2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # The second write died half way; the file at the checkpoint path is the first one, whole.
    survivor = Representation.load(checkpoint)
    assert survivor.meta["progress"]["batches"] == 2
    assert_same(reference(job, max_batches=2), survivor)
    # The dead writer's temporary file is still there until the next save removes it.
    assert len(leftover_temporaries(tmp_path)) == 1
    rep = sketch_model(job.make_model(), job.make_loader(), checkpoint=checkpoint,
                       checkpoint_every=2, **job.SETTINGS)
    assert_same(reference(job), rep)
    assert leftover_temporaries(tmp_path) == []


def test_interrupted_shuffled_indexed_run_resumes(job, tmp_path):
    checkpoint = tmp_path / "indexed.ckpt"

    class Interrupt(Exception):
        pass

    model = job.make_model()

    def stop_at_batch_3(module, inputs):
        if module.calls == 3:
            raise Interrupt

    handle = model.register_forward_pre_hook(stop_at_batch_3)
    with pytest.raises(Interrupt):
        sketch_model(model, job.make_loader(indexed=True), checkpoint=checkpoint,
                     checkpoint_every=1, **job.SETTINGS)
    handle.remove()
    partial = Representation.load(checkpoint)
    assert partial.n == 3 * job.BATCH and partial.row_keys == "index"
    # Resume with another checkpoint interval: the interval is not part of the result.
    rep = sketch_model(job.make_model(), job.make_loader(indexed=True),
                       checkpoint=checkpoint, checkpoint_every=3, **job.SETTINGS)
    expected = reference(job, indexed=True)
    assert expected.row_intervals == [[0, job.N]]
    assert_same(expected, rep)
    assert leftover_temporaries(tmp_path) == []


def test_a_failing_batch_checkpoints_the_batches_before_it(job, tmp_path):
    # No periodic checkpoint falls before the failure (every 100 batches): the
    # batches done before the failing one are written when it raises.
    checkpoint = tmp_path / "failed.ckpt"

    class Failure(Exception):
        pass

    model = job.make_model()

    def fail_at_batch_4(module, inputs):
        if module.calls == 4:
            raise Failure

    handle = model.register_forward_pre_hook(fail_at_batch_4)
    with pytest.raises(Failure):
        sketch_model(model, job.make_loader(), checkpoint=checkpoint, checkpoint_every=100,
                     **job.SETTINGS)
    handle.remove()
    partial = Representation.load(checkpoint)
    assert partial.meta["progress"]["batches"] == 4 and not partial.meta["progress"]["complete"]
    assert_same(reference(job, max_batches=4), partial)
    model = job.make_model()
    rep = sketch_model(model, job.make_loader(), checkpoint=checkpoint, checkpoint_every=100,
                       **job.SETTINGS)
    assert_same(reference(job), rep)
    assert leftover_temporaries(tmp_path) == []


def test_complete_checkpoint_returns_without_running_the_model(job, tmp_path):
    checkpoint = tmp_path / "done.ckpt"
    first = sketch_model(job.make_model(), job.make_loader(), checkpoint=checkpoint,
                         **job.SETTINGS)
    assert_same(reference(job), first)
    assert Representation.load(checkpoint).meta["progress"]["complete"] is True
    model = job.make_model()
    again = sketch_model(model, job.make_loader(), checkpoint=checkpoint, **job.SETTINGS)
    assert model.calls == 0
    assert_same(first, again, dict(rtol=0, atol=0))
    assert leftover_temporaries(tmp_path) == []


@pytest.mark.parametrize("changes, named", [
    (dict(m=32, seed=6), "m, psi_buckets, seed"),        # psi_buckets follows m by default
    (dict(layers=["fc1"]), "layers"),
    (dict(dtype=torch.float32), "dtype"),
    (dict(beta=0.25), "beta"),
    (dict(max_batches=3), "max_batches"),
])
def test_changed_settings_with_an_existing_checkpoint_raise(job, tmp_path, changes, named):
    checkpoint = tmp_path / "settings.ckpt"
    sketch_model(job.make_model(), job.make_loader(), checkpoint=checkpoint,
                 checkpoint_every=4, max_batches=6, **job.SETTINGS)
    before = checkpoint.read_bytes()
    settings = {**job.SETTINGS, "max_batches": 6, **changes}
    with pytest.raises(ValueError, match=f"different settings \\({named}\\)"):
        sketch_model(job.make_model(), job.make_loader(), checkpoint=checkpoint,
                     checkpoint_every=4, **settings)
    assert checkpoint.read_bytes() == before


class LoaderFailure(Exception):
    pass


def failing_loader(loader, fail_at: int):
    """The loader's batches, with ``next()`` raising at batch ``fail_at``."""
    for k, batch in enumerate(loader):
        if k == fail_at:
            raise LoaderFailure(f"could not read batch {k}")
        yield batch


@pytest.mark.parametrize("indexed", [False, True])
def test_loader_error_checkpoint_holds_exactly_the_batches_it_counts(job, tmp_path, indexed):
    # Batches 0, 1, 2 are added; next(data) raises when batch 3 is read.  The checkpoint
    # must say 3 batches (not 2): a resume that re-added batch 2 would count it twice
    # (stream numbering) or be refused forever (dataset indices).
    checkpoint = tmp_path / "loader.ckpt"
    with pytest.raises(LoaderFailure):
        sketch_model(job.make_model(), failing_loader(job.make_loader(indexed), 3),
                     checkpoint=checkpoint, checkpoint_every=100, **job.SETTINGS)
    partial = Representation.load(checkpoint)
    assert partial.meta["progress"]["batches"] == 3
    assert partial.n == 3 * job.BATCH
    assert_same(reference(job, max_batches=3, indexed=indexed), partial)
    model = job.make_model()
    rep = sketch_model(model, job.make_loader(indexed), checkpoint=checkpoint,
                       checkpoint_every=100, **job.SETTINGS)
    assert model.calls == 5
    assert_same(reference(job, indexed=indexed), rep)


def test_interrupt_in_the_model_keeps_the_batches_before_it(job, tmp_path):
    checkpoint = tmp_path / "interrupt.ckpt"
    model = job.make_model()

    def interrupt_at_batch_2(module, inputs):
        if module.calls == 2:
            raise KeyboardInterrupt

    model.register_forward_pre_hook(interrupt_at_batch_2)
    with pytest.raises(KeyboardInterrupt):
        sketch_model(model, job.make_loader(), checkpoint=checkpoint, **job.SETTINGS)
    partial = Representation.load(checkpoint)
    assert partial.meta["progress"]["batches"] == 2
    assert_same(reference(job, max_batches=2), partial)


def partial_checkpoint(job, path, batches: int) -> bytes:
    """A checkpoint of the first ``batches`` batches of the job's loader (the run then fails)."""
    with pytest.raises(LoaderFailure):
        sketch_model(job.make_model(), failing_loader(job.make_loader(), batches),
                     checkpoint=path, checkpoint_every=100, **job.SETTINGS)
    return path.read_bytes()


def short_loader(job, samples: int, batch_size: int = None):
    x, y = next(iter(torch.utils.data.DataLoader(job.make_loader().dataset, batch_size=job.N)))
    dataset = torch.utils.data.TensorDataset(x[:samples], y[:samples])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size or job.BATCH)


def test_resume_with_a_shorter_loader_is_an_error(job, tmp_path):
    checkpoint = tmp_path / "short.ckpt"
    before = partial_checkpoint(job, checkpoint, 4)
    # A loader without a length that ends after 3 batches: found when it ends.
    model = job.make_model()
    three_batches = (batch for k, batch in enumerate(job.make_loader()) if k < 3)
    with pytest.raises(ValueError, match="holds 4 batches, but data yielded only 3"):
        sketch_model(model, three_batches, checkpoint=checkpoint, **job.SETTINGS)
    # A DataLoader of 3 batches: its length says so before anything runs.
    with pytest.raises(ValueError, match="holds 4 batches, but data has 3"):
        sketch_model(model, short_loader(job, 15), checkpoint=checkpoint, **job.SETTINGS)
    # As many batches, but not the same ones (batches of 4 rows, not 5).
    with pytest.raises(ValueError, match="holds 20 rows from the first 4 batches"):
        sketch_model(model, short_loader(job, job.N, batch_size=4), checkpoint=checkpoint,
                     **job.SETTINGS)
    assert model.calls == 0
    assert checkpoint.read_bytes() == before


def test_a_resume_writes_nothing_while_it_skips_the_batches_it_holds(job, tmp_path):
    # The checkpoint holds 4 batches; the resume checkpoints every 2 and its loader fails
    # while batch 3 is read, that is, while the held batches are still being skipped.
    checkpoint = tmp_path / "skip.ckpt"
    before = partial_checkpoint(job, checkpoint, 4)
    model = job.make_model()
    with pytest.raises(LoaderFailure):
        sketch_model(model, failing_loader(job.make_loader(), 3), checkpoint=checkpoint,
                     checkpoint_every=2, **job.SETTINGS)
    assert model.calls == 0
    assert checkpoint.read_bytes() == before
    rep = sketch_model(job.make_model(), job.make_loader(), checkpoint=checkpoint,
                       checkpoint_every=2, **job.SETTINGS)
    assert_same(reference(job), rep)


def test_finished_checkpoint_with_data_of_another_length_is_an_error(job, tmp_path):
    checkpoint = tmp_path / "finished.ckpt"
    sketch_model(job.make_model(), job.make_loader(), checkpoint=checkpoint, **job.SETTINGS)
    before = checkpoint.read_bytes()
    with pytest.raises(ValueError, match="holds a finished run of 8 batches, but data has 5"):
        sketch_model(job.make_model(), short_loader(job, 25), checkpoint=checkpoint,
                     **job.SETTINGS)
    assert checkpoint.read_bytes() == before


def test_numpy_scalar_settings_are_written_as_json_numbers(job, tmp_path):
    checkpoint = tmp_path / "numpy.ckpt"
    settings = {**job.SETTINGS, "m": np.int64(16), "seed": np.int64(5)}
    partial_settings = dict(settings, beta=np.float32(0.5), max_batches=np.int64(6))
    with pytest.raises(LoaderFailure):
        sketch_model(job.make_model(), failing_loader(job.make_loader(), 4),
                     checkpoint=checkpoint, checkpoint_every=np.int64(2), **partial_settings)
    saved = Representation.load(checkpoint).meta["progress"]["settings"]
    assert saved["m"] == 16 and type(saved["m"]) is int
    assert saved["beta"] == 0.5 and saved["max_batches"] == 6
    rep = sketch_model(job.make_model(), job.make_loader(), checkpoint=checkpoint,
                       checkpoint_every=np.int64(2), **partial_settings)
    assert_same(reference(job, max_batches=6), rep)


# --------------------------------------------------------------------------- atomic writes

def test_save_writes_a_temporary_then_renames(tmp_path, monkeypatch):
    rep = Representation(8, 1, beta=0.5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    rep.update({"a": torch.randn(5, 3, generator=gen, dtype=torch.float64)},
               {"a": torch.randn(5, 2, generator=gen, dtype=torch.float64)})
    path = tmp_path / "rep.safetensors"
    rep.save(path)
    before = path.read_bytes()
    rep.update({"a": torch.ones(2, 3, dtype=torch.float64)},
               {"a": torch.ones(2, 2, dtype=torch.float64)})

    renames = []

    def failing_replace(src, dst):
        renames.append((os.fspath(src), os.fspath(dst)))
        assert Representation.load(src).n == 7       # the new state is complete before the rename
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        rep.save(path)
    monkeypatch.undo()
    (src, dst), = renames
    assert dst == str(path) and src != dst
    assert os.path.dirname(os.path.abspath(src)) == str(tmp_path)   # same file system
    assert path.read_bytes() == before                            # old file intact
    assert Representation.load(path).n == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_file_gets_the_permissions_the_umask_gives(tmp_path):
    rep = Representation(8, 1, beta=0.5, dtype=torch.float64)
    rep.update({"a": torch.ones(2, 3, dtype=torch.float64)},
               {"a": torch.ones(2, 2, dtype=torch.float64)})
    previous = os.umask(0o022)
    try:
        rep.save(tmp_path / "rep.safetensors")
        with open(tmp_path / "plain.bin", "wb"):
            pass
    finally:
        os.umask(previous)
    plain = stat.S_IMODE(os.stat(tmp_path / "plain.bin").st_mode)
    assert plain == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "rep.safetensors").st_mode) == plain


# --------------------------------------------------------------------------- arguments

def test_checkpoint_argument_errors(job, tmp_path):
    data, model = job.make_loader(), job.make_model()
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="checkpoint_every"):
            sketch_model(model, data, checkpoint=tmp_path / "x.ckpt", checkpoint_every=bad,
                         **job.SETTINGS)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint"):
        sketch_model(model, data, checkpoint_every=2, **job.SETTINGS)
    into = Representation(16, 5, beta=0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="into"):
        sketch_model(model, data, checkpoint=tmp_path / "x.ckpt", into=into, **job.SETTINGS)
    assert model.calls == 0
    assert not list(tmp_path.glob("x.ckpt*")) and not leftover_temporaries(tmp_path)
