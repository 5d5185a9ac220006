"""``sketch_model`` on real architectures: ResNet-18 (CIFAR), ViT, a BERT-shaped text encoder
with Hugging Face-style batches and outputs, a BatchNorm net found in train mode -- and, when
the optional ``transformers`` package is installed, models built from its tiny configs.

References are computed here without the library's pass: each sample runs alone, unpadded,
through the model in float64; a test hook replaces the layer's output by a leaf tensor; the
expected gradient is the q-weighted sum of the per-class cross-entropy gradients (one
backward per class, ``q ∝ p^beta``), pooled by hand (token mean: features averaged over the
real tokens, gradients summed; first token; spatial flatten/mean); the sketch is the dense
``S`` from the library's hash applied to the stacked rows.
"""
from __future__ import annotations

import copy
import importlib.util
import pathlib
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from architectures import BatchNormCNN, ModelOutput, ResNet18, TextClassifier, ViT, randomize_batchnorm
from conftest import dense_sketch
from nnsim_fast import sketch_model
from nnsim_fast.extract import exact_model

TOL = dict(rtol=1e-9, atol=1e-10)
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS,
                                        reason="the optional transformers package is not installed")
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "models.md"


# --------------------------------------------------------------------------- references

def logits_of(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    return output["logits"]


def layer_outputs(model: nn.Module, layers: Sequence[str], call: Callable[[], object]
                  ) -> Tuple[Dict[str, Tensor], object]:
    """Run ``call()`` keeping each probed layer's output (or its first element) in the graph."""
    captured: Dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def keep(name):
        def hook(module, inputs, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in layers]
    try:
        output = call()
    finally:
        for handle in handles:
            handle.remove()
    return captured, output


def expected_gradients(logits: Tensor, hs: List[Tensor], beta: float,
                       label: Optional[int]) -> List[Tensor]:
    """d E_q[CE(logits, y)] / d h for each h: one backward per class, weighted by q."""
    if label is not None:
        return list(torch.autograd.grad(F.cross_entropy(logits, torch.tensor([label])), hs))
    p = torch.softmax(logits.detach().double(), dim=-1)[0]
    q = p ** beta / (p ** beta).sum()
    totals = [torch.zeros_like(h) for h in hs]
    for c in range(logits.shape[1]):
        grads = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([c])), hs, retain_graph=True)
        for total, g_c in zip(totals, grads):
            total += q[c] * g_c
    return totals


def per_sample(model: nn.Module, layers, calls: Sequence[Callable[[nn.Module], object]],
               beta: float = 0.5, labels: Optional[Sequence[int]] = None):
    """Unpooled ``(h, g)`` of each sample (its own forward, in eval mode), without the batch axis:
    a list for one layer name, a dict of lists for a list of names."""
    names = [layers] if isinstance(layers, str) else list(layers)
    model = copy.deepcopy(model).eval()
    out: Dict[str, List[Tuple[Tensor, Tensor]]] = {name: [] for name in names}
    for i, call in enumerate(calls):
        hs, output = layer_outputs(model, names, lambda call=call: call(model))
        grads = expected_gradients(logits_of(output), [hs[n] for n in names], beta,
                                   None if labels is None else labels[i])
        for name, g in zip(names, grads):
            out[name].append((hs[name].detach()[0], g.detach()[0]))
    return out[layers] if isinstance(layers, str) else out


def batch_reference(model: nn.Module, layers: Sequence[str], x: Tensor, beta: float = 0.5):
    """Like :func:`per_sample` for models without padding, with one forward for the batch: in
    eval mode no sample sees another, so the gradient of ``sum_i q_ic CE_i(c)`` at a layer is,
    row by row, each sample's own."""
    model = copy.deepcopy(model).eval()
    hs, output = layer_outputs(model, layers, lambda: model(x))
    logits = logits_of(output)
    p = torch.softmax(logits.detach().double(), dim=-1)
    q = p ** beta / (p ** beta).sum(1, keepdim=True)
    totals = [torch.zeros_like(hs[n]) for n in layers]
    for c in range(logits.shape[1]):
        target = torch.full((x.shape[0],), c)
        loss = (q[:, c] * F.cross_entropy(logits, target, reduction="none")).sum()
        for total, g_c in zip(totals, torch.autograd.grad(loss, [hs[n] for n in layers],
                                                          retain_graph=True)):
            total += g_c
    return {name: [(hs[name].detach()[i], total[i]) for i in range(x.shape[0])]
            for name, total in zip(layers, totals)}


def pool_tokens(pairs, tokens: str) -> Tuple[Tensor, Tensor]:
    if tokens == "mean":
        return (torch.stack([h.mean(0) if h.dim() == 2 else h for h, _ in pairs]),
                torch.stack([g.sum(0) if g.dim() == 2 else g for _, g in pairs]))
    if tokens == "first":
        return (torch.stack([h[0] if h.dim() == 2 else h for h, _ in pairs]),
                torch.stack([g[0] if g.dim() == 2 else g for _, g in pairs]))
    return torch.stack([h.flatten() for h, _ in pairs]), torch.stack([g.flatten() for _, g in pairs])


def assert_sketch(rep, name: str, f: Tensor, g: Tensor, S: Tensor, tol=TOL) -> None:
    layer = rep.layers[name]
    torch.testing.assert_close(layer.sketch_f, S @ f, **tol)
    torch.testing.assert_close(layer.sketch_g, S @ g, **tol)
    torch.testing.assert_close(layer.sum_f, f.sum(0), **tol)
    torch.testing.assert_close(layer.sum_g, g.sum(0), **tol)


def assert_same_sketch(a, b, names, tol=TOL) -> None:
    assert a.n == b.n
    for name in names:
        for key, value in a.layers[name].tensors().items():
            torch.testing.assert_close(b.layers[name].tensors()[key], value, **tol)


# --------------------------------------------------------------------------- ResNet-18

def make_resnet() -> ResNet18:
    torch.manual_seed(0)
    model = ResNet18(width=4, classes=4).double()
    randomize_batchnorm(model, seed=1)
    return model


@pytest.mark.parametrize("spatial", ["flatten", "mean"])
def test_resnet18_cifar_against_reference(spatial):
    model = make_resnet()
    model.train()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    layers = ["layer1", "layer3", "layer4", "fc"]
    rep = sketch_model(model, [x[:3], x[3:]], layers=layers, m=16, seed=3, spatial=spatial,
                       dtype=torch.float64, progress=False)
    S = dense_sketch(5, 16, 3)
    reference = batch_reference(model, layers, x)
    for name in layers:
        pairs = reference[name]
        if spatial == "mean" and pairs[0][0].dim() == 3:
            f = torch.stack([h.mean(dim=(1, 2)) for h, _ in pairs])
            g = torch.stack([g.sum(dim=(1, 2)) for _, g in pairs])
        else:
            f, g = pool_tokens(pairs, "flatten")
        assert_sketch(rep, name, f, g, S)
        assert rep.layers[name].feature_shape == tuple(pairs[0][0].shape)
    # The model was in train mode: every flag is restored.
    assert all(module.training for module in model.modules())


def test_resnet18_default_layers_are_its_stages():
    model = make_resnet()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rep = sketch_model(model, [x], m=8, spatial="mean", dtype=torch.float64, progress=False)
    assert rep.layer_names == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert rep.layers["layer4"].dims["df"] == 32


# --------------------------------------------------------------------------- BatchNorm in train mode

def test_batchnorm_net_found_in_train_mode_is_sketched_in_eval_mode():
    torch.manual_seed(5)
    model = BatchNormCNN().double()
    randomize_batchnorm(model, seed=6)
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    layers = ["block1", "block2", "head"]
    whole = sketch_model(model, [x], layers=layers, m=16, seed=1, dtype=torch.float64,
                         progress=False)
    # Per-sample independence: with batch statistics (train mode) a sample's features
    # would depend on its batch mates; with running statistics they do not.
    single = sketch_model(model, list(x.split(1)), layers=layers, m=16, seed=1,
                          dtype=torch.float64, progress=False)
    assert_same_sketch(whole, single, layers)
    S = dense_sketch(8, 16, 1)
    pairs = per_sample(model, "block1", [lambda mod, i=i: mod(x[i:i + 1]) for i in range(8)])
    assert_sketch(whole, "block1", *pool_tokens(pairs, "flatten"), S)
    # Running statistics were not updated, and the train flags are back.
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert all(module.training for module in model.modules())
    with torch.no_grad():
        train_out = model(x)
    assert not torch.allclose(train_out, copy.deepcopy(model).eval()(x))


# --------------------------------------------------------------------------- ViT

def make_vit() -> ViT:
    torch.manual_seed(8)
    return ViT(image=16, patch=4, dim=16, depth=2, heads=2, classes=5).double()


@pytest.mark.parametrize("tokens", ["mean", "first", "flatten"])
def test_vit_tokens_pooled_over_the_token_axis(tokens):
    model = make_vit()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    layers = ["patch_embed", "blocks.0", "blocks.1", "head"]
    rep = sketch_model(model, [x[:2], x[2:]], layers=layers, m=16, seed=4, tokens=tokens,
                       dtype=torch.float64, progress=False)
    S = dense_sketch(5, 16, 4)
    widths = {"mean": 16, "first": 16, "flatten": 17 * 16}
    reference = batch_reference(model, layers, x)
    for name in layers:
        assert_sketch(rep, name, *pool_tokens(reference[name], tokens), S)
        if name == "blocks.0":
            assert rep.layers[name].dims["df"] == widths[tokens]
    assert rep.meta["tokens"] == tokens


# --------------------------------------------------------------------------- BERT-shaped

LENGTHS = [3, 9, 5, 10, 4, 7, 6]
LABELS = [0, 2, 1, 1, 0, 2, 1]


def make_text_model(**kwargs) -> TextClassifier:
    torch.manual_seed(10)
    return TextClassifier(**kwargs).double()


def sentences() -> List[Tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(11)
    out = []
    for length in LENGTHS:
        ids = torch.randint(1, 50, (length,), generator=gen)
        types = (torch.arange(length) >= length // 2).long()
        out.append((ids, types))
    return out


def hf_batches(pad_to: Optional[int], splits=(3, 2, 2), labels: bool = True) -> List[Dict]:
    """Hugging Face-style dict batches, padded to ``pad_to`` (None: each batch's longest)."""
    batches, start = [], 0
    sents = sentences()
    for size in splits:
        chunk = sents[start:start + size]
        width = pad_to or max(ids.shape[0] for ids, _ in chunk)
        ids = torch.zeros(size, width, dtype=torch.long)
        types = torch.zeros(size, width, dtype=torch.long)
        mask = torch.zeros(size, width, dtype=torch.long)
        for row, (s_ids, s_types) in enumerate(chunk):
            ids[row, :len(s_ids)], types[row, :len(s_ids)], mask[row, :len(s_ids)] = s_ids, s_types, 1
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if labels:
            batch["labels"] = torch.tensor(LABELS[start:start + size])
        batches.append(batch)
        start += size
    return batches


def unpadded_calls() -> List[Callable]:
    return [lambda mod, ids=ids, types=types: mod(input_ids=ids[None], token_type_ids=types[None],
                                                  attention_mask=torch.ones(1, len(ids)).long())
            for ids, types in sentences()]


TEXT_LAYERS = ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler",
               "classifier"]


def test_text_encoder_default_layers_error_lists_probeable_blocks():
    model = make_text_model()
    with pytest.raises(TypeError) as info:
        sketch_model(model, hf_batches(None), m=8, progress=False)
    message = str(info.value)
    assert "'bert'" in message and "ModelOutput" in message and "default" in message
    for name in ("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler"):
        assert f"'{name}'" in message
    assert all(not module._forward_hooks for module in model.modules())


@pytest.mark.parametrize("tokens", ["mean", "first"])
def test_text_encoder_padding_never_changes_the_representation(tokens):
    model = make_text_model()
    settings = dict(layers=TEXT_LAYERS, m=16, seed=5, tokens=tokens, dtype=torch.float64,
                    progress=False)
    short = sketch_model(model, hf_batches(12), **settings)
    long = sketch_model(model, hf_batches(20), **settings)
    ragged = sketch_model(model, hf_batches(None), **settings)      # lengths vary across batches
    assert_same_sketch(short, long, TEXT_LAYERS)
    assert_same_sketch(short, ragged, TEXT_LAYERS)
    # ... and each is the per-sample, unpadded reference.
    S = dense_sketch(len(LENGTHS), 16, 5)
    reference = per_sample(model, TEXT_LAYERS, unpadded_calls())
    for name in TEXT_LAYERS:
        assert_sketch(short, name, *pool_tokens(reference[name], tokens), S)
    assert short.layers["bert.encoder.layer.0"].dims["df"] == 16


def test_text_encoder_labels_come_from_the_labels_entry():
    model = make_text_model()
    rep = sketch_model(model, hf_batches(None), layers=["bert.encoder.layer.1"], m=16, seed=2,
                       target="labels", dtype=torch.float64, progress=False)
    pairs = per_sample(model, "bert.encoder.layer.1", unpadded_calls(), labels=LABELS)
    assert_sketch(rep, "bert.encoder.layer.1", *pool_tokens(pairs, "mean"),
                  dense_sketch(len(LENGTHS), 16, 2))
    assert rep.meta["target"] == "labels"


def test_text_encoder_tokens_flatten_needs_one_length():
    model = make_text_model()
    fixed = sketch_model(model, hf_batches(12), layers=["bert.encoder.layer.0"], m=8,
                         tokens="flatten", dtype=torch.float64, progress=False)
    assert fixed.layers["bert.encoder.layer.0"].dims["df"] == 12 * 16
    with pytest.raises(ValueError, match="tokens='flatten'") as info:
        sketch_model(model, hf_batches(None), layers=["bert.encoder.layer.0"], m=8,
                     tokens="flatten", dtype=torch.float64, progress=False)
    assert "'bert.encoder.layer.0'" in str(info.value) and "batch 1" in str(info.value)


def test_text_encoder_tuple_of_two_tensors_needs_output_fn():
    model = make_text_model(tuple_output=True)
    with pytest.raises(TypeError, match="output_fn"):
        sketch_model(model, hf_batches(None), layers=["bert.pooler"], m=8, progress=False)
    with_fn = sketch_model(model, hf_batches(None), layers=["bert.pooler"], m=8, seed=1,
                           output_fn=lambda out: out[1], dtype=torch.float64, progress=False)
    plain = sketch_model(make_text_model(), hf_batches(None), layers=["bert.pooler"], m=8, seed=1,
                         dtype=torch.float64, progress=False)
    assert_same_sketch(plain, with_fn, ["bert.pooler"])


def test_text_encoder_features_only():
    model = make_text_model()
    both = sketch_model(model, hf_batches(None), layers=TEXT_LAYERS, m=16, seed=6,
                        dtype=torch.float64, progress=False)
    backward_calls = []
    handle = model.classifier.register_full_backward_hook(lambda *args: backward_calls.append(1))
    try:
        features = sketch_model(model, hf_batches(None), layers=TEXT_LAYERS, m=16, seed=6,
                                gradients=False, dtype=torch.float64, progress=False)
    finally:
        handle.remove()
    assert backward_calls == []
    assert features.options["gradients"] is False
    for name in TEXT_LAYERS:
        torch.testing.assert_close(features.layers[name].sketch_f, both.layers[name].sketch_f, **TOL)
        assert "sketch_g" not in features.layers[name].tensors()
    torch.testing.assert_close(features.kernel("bert.pooler", kind="feature"),
                               both.kernel("bert.pooler", kind="feature"), **TOL)
    with pytest.raises(ValueError, match="gradients"):
        features.kernel("bert.pooler", kind="hadamard")


def test_text_encoder_exact_model_holds_the_reference_rows():
    exact = pytest.importorskip("nnsim_fast.exact", reason="nnsim_fast.exact is not available")
    model = make_text_model()
    names = ["bert.encoder.layer.0", "bert.pooler"]
    rep = exact_model(model, hf_batches(20), layers=names, dtype=torch.float64, progress=False)
    try:
        assert isinstance(rep, exact.ExactRepresentation) and rep.n == len(LENGTHS)
        reference = per_sample(model, names, unpadded_calls())
        for name in names:
            f, g = pool_tokens(reference[name], "mean")
            K = exact.exact_kernel(rep, name, kind="hadamard", centered=False)
            torch.testing.assert_close(K, (f @ f.T) * (g @ g.T), **TOL)
    finally:
        rep.close()


def test_text_encoder_compare_models_with_padded_batches_is_exact_in_one_block():
    """Dict batches padded per batch (token lengths vary): compare_models pools them into one
    block, so it must equal the exact CKA of the unpadded, token-pooled rows."""
    import nnsim_fast as nf
    from nnsim_fast.exact import ExactRepresentation

    a, b = make_text_model(), make_text_model()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = nf.compare_models(a, b, hf_batches(None), TEXT_LAYERS, TEXT_LAYERS, kind="hadamard",
                            dtype=torch.float64, progress=False)
    reps = []
    for model in (a, b):
        rep = ExactRepresentation(dtype=torch.float64)
        reference = per_sample(model, TEXT_LAYERS, unpadded_calls())
        pooled = {name: pool_tokens(reference[name], "mean") for name in TEXT_LAYERS}
        rep.update({k: f for k, (f, _) in pooled.items()}, {k: g for k, (_, g) in pooled.items()})
        reps.append(rep)
    want = nf.similarity(*reps, kind="hadamard").matrix
    torch.testing.assert_close(got.matrix, want, rtol=1e-6, atol=1e-8)
    assert got.n == len(LENGTHS) and got.block == len(LENGTHS)


# --------------------------------------------------------------------------- Hugging Face models

def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(12)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).double()


@needs_transformers
def test_hf_bert_default_layers_error_names_the_encoder_blocks():
    with pytest.raises(TypeError) as info:
        sketch_model(tiny_bert(), hf_batches(None), m=8, progress=False)
    assert "'bert.encoder.layer.0'" in str(info.value) and "'bert.pooler'" in str(info.value)


@needs_transformers
def test_hf_bert_padding_invariance_and_reference():
    model = tiny_bert()
    layers = ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler",
              "classifier"]
    settings = dict(layers=layers, m=16, seed=7, dtype=torch.float64, progress=False)
    short = sketch_model(model, hf_batches(12), **settings)
    long = sketch_model(model, hf_batches(20), **settings)
    ragged = sketch_model(model, hf_batches(None), **settings)
    assert_same_sketch(short, long, layers, tol=dict(rtol=1e-7, atol=1e-9))
    assert_same_sketch(short, ragged, layers, tol=dict(rtol=1e-7, atol=1e-9))
    S = dense_sketch(len(LENGTHS), 16, 7)
    reference = per_sample(model, layers, unpadded_calls())
    for name in layers:
        assert_sketch(short, name, *pool_tokens(reference[name], "mean"), S,
                      tol=dict(rtol=1e-7, atol=1e-9))


@needs_transformers
def test_hf_vit_blocks_against_reference():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(13)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       num_labels=4)
    model = ViTForImageClassification(config).double()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    # transformers 4 names the blocks vit.encoder.layer.N, transformers 5 vit.layers.N
    blocks = [name for name, _ in model.named_modules()
              if re.fullmatch(r"vit\.(encoder\.layer|layers)\.\d+", name)]
    assert len(blocks) == 2
    layers = ["vit.embeddings", *blocks, "classifier"]
    rep = sketch_model(model, [{"pixel_values": x[:2]}, {"pixel_values": x[2:]}], layers=layers,
                       m=16, seed=8, dtype=torch.float64, progress=False)
    S = dense_sketch(4, 16, 8)
    reference = per_sample(model, layers, [lambda mod, i=i: mod(pixel_values=x[i:i + 1])
                                           for i in range(4)])
    for name in layers:
        assert_sketch(rep, name, *pool_tokens(reference[name], "mean"), S,
                      tol=dict(rtol=1e-7, atol=1e-9))


# --------------------------------------------------------------------------- docs/models.md

def doc_snippets() -> List[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_docs_have_snippets():
    assert len(doc_snippets()) >= 5


@pytest.mark.parametrize("index", range(len(doc_snippets())))
def test_docs_models_snippets_run(index):
    code = doc_snippets()[index]
    if "transformers" in code and not HAS_TRANSFORMERS:
        pytest.skip("the snippet needs the optional transformers package")
    exec(compile(code, f"{DOCS.name}[{index}]", "exec"), {"__name__": "docs_snippet"})


def test_model_output_like_dicts_are_read_by_key_and_attribute():
    out = ModelOutput(logits=torch.ones(2, 3))
    assert out.logits is out["logits"]
    assert not hasattr(out, "missing")
