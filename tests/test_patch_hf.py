"""fastswin.patch / unpatch on Hugging Face transformers Swin (SwinAttention) and Swinv2
(Swinv2SelfAttention) models.

Oracle: the same model unpatched. Tiny random-init models (built from a config, nothing
downloaded) in float64 on the reference backend: outputs and every gradient within 1e-12 (HF's
``eager`` V1 softmax runs in float32 even for float64 models: 1e-6 there). Image sizes give
feature maps that are not multiples of the window, so HF's pad-before-roll path runs.
"""
import copy
import pickle
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (SwinConfig, SwinForImageClassification, Swinv2Config,  # noqa: E402
                          Swinv2ForImageClassification)
from transformers.models.swinv2 import modeling_swinv2  # noqa: E402

import fastswin  # noqa: E402
from fastswin import _patch_hf  # noqa: E402
from fastswin._patch import is_patched, patch, unpatch  # noqa: E402
from test_patch import _assert_same_run as _patch_assert_same_run, _run as _patch_run  # noqa: E402

f64 = torch.float64
TOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny ops: intra-op threads only add overhead (100x slower on a loaded 2-core machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(v2, img=40, impl="sdpa", embed_dim=16, **kw):
    """40x40 image, patch 4 -> 10x10 (padded to 12x12, shifted) then 5x5 (padded to 8x8, shifted)."""
    kw = dict(dict(image_size=img, patch_size=4, embed_dim=embed_dim, depths=(2, 2), num_heads=(2, 4), window_size=4,
                   num_labels=10, drop_path_rate=0.0), **kw)
    if v2:
        m = Swinv2ForImageClassification(Swinv2Config(**kw))
    else:
        m = SwinForImageClassification(SwinConfig(**kw))
        m.config._attn_implementation = impl
    m = m.to(f64).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


def _x(img=40, batch=2):
    return torch.randn(batch, 3, img, img, dtype=f64, generator=torch.Generator().manual_seed(0))


def _run(model, x, seed=None, **kw):
    return _patch_run(model, x, seed, output=lambda o: o.logits, **kw)


def _assert_same_run(a, b, tol=TOL):
    _patch_assert_same_run(a, b, tol)


def _count_op(monkeypatch):
    calls = []
    for name in ("window_attention", "window_attention_v2"):
        fn = getattr(_patch_hf, name)
        monkeypatch.setattr(_patch_hf, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    return calls


@pytest.mark.parametrize("v2,impl,tol", [(False, "sdpa", TOL), (False, "eager", 1e-6), (True, None, TOL)])
def test_patched_equals_original(v2, impl, tol, monkeypatch):
    m = _model(v2, impl=impl)
    x = _x()
    keys = list(m.state_dict())
    want = _run(m, x)
    calls = _count_op(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        assert patch(m, backend="reference") == 4
        assert is_patched(m)
        got = _run(m, x)
    assert len(calls) == 4
    _assert_same_run(want, got, tol)
    assert list(m.state_dict()) == keys
    assert patch(m, backend="reference") == 4  # again: only sets the backend
    # pickle / deepcopy of a patched model
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert is_patched(c)
        torch.testing.assert_close(c(x).logits, got[0], rtol=0, atol=tol)
    assert unpatch(m) == 4 and not is_patched(m)
    assert torch.equal(m(x).logits, want[0])


def test_v2_pretrained_window_size():
    # window 4 trained at 8 / 6: HF's own coords table is what the patched path uses
    m = _model(True, img=36, pretrained_window_sizes=(8, 6))
    x = _x(36)
    want = _run(m, x)
    patch(m, backend="reference")
    _assert_same_run(want, _run(m, x))


@pytest.mark.parametrize("v2,impl", [(False, "sdpa"), (False, "eager"), (True, None)])
def test_training_dropout_same_draws(v2, impl):
    m = _model(v2, impl=impl, attention_probs_dropout_prob=0.3).train()
    x = _x()
    want = _run(m, x, seed=7)
    patch(m)  # auto -> reference for dropout calls
    _assert_same_run(want, _run(m, x, seed=7), TOL if impl != "eager" else 1e-6)


@pytest.mark.parametrize("v2", [False, True])
def test_output_attentions_falls_back(v2):
    m = _model(v2, impl="eager")
    x = _x(batch=1)
    want = m(x, output_attentions=True)
    patch(m, backend="reference")
    with pytest.warns(RuntimeWarning, match="output_attentions=True"):
        got = m(x, output_attentions=True)
    assert torch.equal(got.logits, want.logits)
    assert len(got.attentions) == len(want.attentions) > 0
    for a, b in zip(got.attentions, want.attentions):
        assert torch.equal(a, b)


def test_unknown_attn_implementation_falls_back():
    from transformers import AttentionInterface
    from transformers.models.swin.modeling_swin import eager_attention_forward

    AttentionInterface.register("fastswin_test_kernel", eager_attention_forward)
    m = _model(False, impl="fastswin_test_kernel")
    x = _x(batch=1)
    want = m(x).logits
    patch(m, backend="reference")
    with pytest.warns(RuntimeWarning, match="fastswin_test_kernel"):
        assert torch.equal(m(x).logits, want)


def test_unrecognised_forward_raises(monkeypatch):
    m = _model(True)

    class Sub(modeling_swinv2.Swinv2SelfAttention):
        def forward(self, hidden_states, attention_mask=None, output_attentions=False):
            return super().forward(hidden_states, attention_mask, output_attentions)

    m.swinv2.encoder.layers[0].blocks[0].attention.self.__class__ = Sub
    with pytest.raises(TypeError, match=r"Sub\) overrides forward"):
        patch(m)
    assert not is_patched(m)
    m.swinv2.encoder.layers[0].blocks[0].attention.self.__class__ = modeling_swinv2.Swinv2SelfAttention
    monkeypatch.setattr(_patch_hf, "_V2_SIG", [])  # as if another transformers version
    with pytest.raises(TypeError, match="unrecognised Swinv2SelfAttention"):
        patch(m)
    assert not is_patched(m)


def test_transformers_not_imported(monkeypatch):
    """fastswin looks the HF classes up in sys.modules: patching a torchvision model imports nothing."""
    from torchvision.models.swin_transformer import SwinTransformer

    for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    assert _patch_hf.targets() == []
    m = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4])
    assert patch(m) == 2
    assert not any(n == "transformers" or n.startswith("transformers.") for n in sys.modules)


@pytest.mark.triton
@pytest.mark.parametrize("v2", [False, True])
def test_triton_backend_equals_reference(v2):
    from fastswin import backends

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # one stage: 28x28 image -> 7x7 map, padded to 8x8; unshifted and shifted block
    m = _model(v2, img=28, depths=(2,), num_heads=(2,)).to(dev)
    x = _x(28, batch=1).to(dev)
    if dev == "cuda":  # no fp64 Triton on a GPU
        m, x = m.float(), x.float()
    patch(m, backend="reference")
    want = _run(m, x)
    patch(m, backend="triton")
    got = _run(m, x)
    assert backends._LAST["window_attention_v2" if v2 else "window_attention"] == "triton"
    _assert_same_run(want, got, 1e-10 if dev == "cpu" else 1e-4)
