"""The model zoo: models people actually export from torchvision, timm and transformers,
compiled for the host as a new user would (random weights, batch 1, ``compile(...)``).

Every model goes through each of its routes and is compared with torch eager
(max error / max |reference| <= 1e-4):

- ``onnx``: ``torch.onnx.export(dynamo=False)`` (the TorchScript exporter), opset 17;
- ``onnx-dynamo``: ``torch.onnx.export(dynamo=True)``: for GPT-2 besides the TorchScript
  exporter, and instead of it for Llama and Qwen2, where that exporter itself fails (with
  transformers 5.x: "conversion of scaled_dot_product_attention not implemented if
  enable_gqa is True");
- ``torch``: ``compile(module, example_inputs=...)`` (torch.export, our ATen importer).

CI time: each compile builds 30-150 kernels (10-30 s here), so by default the first route of
each model runs through ``compile`` + the TVM kernels and the others through the importer +
the reference interpreter; ``NPUCC_ZOO_COMPILE_ALL=1`` compiles every route.

Sizes are small so that the whole zoo stays within minutes: 32-64 px images (224 where a
model's attention biases fix the resolution), 2-layer transformers with hidden 128-256,
16 tokens. The real all-MiniLM-L6-v2 (trained weights) is exported as users do, without
``token_type_ids``. Detection (ssdlite320) is refused with the data-dependent-shape error and
compiles when cut at the head outputs.

torchvision and timm come from ``examples/vision.py`` (installed in their own folder by
.ci/run); without them their models are skipped, not failed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from compiler import compile  # noqa: E402
from compiler.errors import ImportError_  # noqa: E402
from compiler.frontends import from_onnx, from_torch  # noqa: E402
from compiler.ir import interpret  # noqa: E402
from examples.vision import import_torchvision  # noqa: E402

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple]
    input_names: tuple[str, ...]
    routes: tuple[str, ...] = ("onnx", "torch")


class FirstOutput(torch.nn.Module):
    """A transformers model returning one tensor (``last_hidden_state`` / ``logits``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        out = self.model(*args)
        return out[0] if isinstance(out, tuple) else next(iter(out.values()))


def _seeded(fn: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def build():
        torch.manual_seed(0)
        return fn().eval()
    return build


def _image(size: int) -> Callable[[], tuple]:
    return lambda: (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)),)


def _tokens(with_mask: bool = True) -> Callable[[], tuple]:
    def make():
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, 1000, (1, 16), generator=g)
        if not with_mask:
            return (ids,)
        mask = torch.ones(1, 16, dtype=torch.long)
        mask[0, -3:] = 0  # padded tail: the attention-mask arithmetic is exercised
        return ids, mask
    return make


# -- torchvision / timm ------------------------------------------------------------------
def _tv(name: str, **kw) -> Callable[[], torch.nn.Module]:
    def build():
        tv = import_torchvision()
        if name.startswith("segmentation."):
            return getattr(tv.models.segmentation, name.split(".")[1])(
                weights=None, weights_backbone=None, **kw)
        return getattr(tv.models, name)(weights=None, **kw)
    return _seeded(build)


def _vit_b_16():
    model = _tv("vit_b_16", image_size=32)()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised: not a test
    return model


class SegmentationOut(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def _timm(name: str) -> Callable[[], torch.nn.Module]:
    def build():
        import_torchvision()
        import timm

        return timm.create_model(name, pretrained=False)
    return _seeded(build)


# -- transformers ------------------------------------------------------------------------
def _hf(make: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    return _seeded(lambda: FirstOutput(make().eval()))


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=256))


def _distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(DistilBertConfig(vocab_size=1000, dim=128, n_layers=2, n_heads=4,
                                            hidden_dim=256))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=128, n_layer=2, n_head=4,
                                      n_positions=64, bos_token_id=0, eos_token_id=0))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512, max_position_embeddings=64))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512, max_position_embeddings=64))


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=1000, d_model=128, d_kv=32, d_ff=256,
                                   num_layers=2, num_heads=4))


def _whisper_encoder():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(d_model=128, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=256, num_mel_bins=16, max_source_positions=32,
                        decoder_layers=1, decoder_attention_heads=4, vocab_size=1000,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0,
                        decoder_start_token_id=0)
    return WhisperForConditionalGeneration(cfg).get_encoder()


def _vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=256, image_size=32, patch_size=8))


def _minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from examples.models import minilm

    return minilm()[0]


def _mel():
    return (torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(3)),)


# the TorchScript exporter fails on these (scaled_dot_product_attention with enable_gqa)
DYNAMO = ("onnx-dynamo", "torch")
ZOO = [
    Model("resnet18", _tv("resnet18"), _image(64), ("image",)),
    Model("mobilenet_v3_small", _tv("mobilenet_v3_small"), _image(64), ("image",)),
    Model("efficientnet_b0", _tv("efficientnet_b0"), _image(64), ("image",)),
    Model("convnext_tiny", _tv("convnext_tiny"), _image(32), ("image",)),
    Model("swin_t", _tv("swin_t"), _image(64), ("image",)),
    Model("regnet_y_400mf", _tv("regnet_y_400mf"), _image(64), ("image",)),
    Model("vit_b_16", _seeded(_vit_b_16), _image(32), ("image",)),
    Model("deeplabv3_mobilenet_v3_large",
          _seeded(lambda: SegmentationOut(_tv("segmentation.deeplabv3_mobilenet_v3_large",
                                              aux_loss=False)())),
          _image(64), ("image",)),
    Model("efficientformer_l1", _timm("efficientformer_l1"), _image(224), ("image",)),
    Model("ghostnet_100", _timm("ghostnet_100"), _image(64), ("image",)),
    Model("levit_128s", _timm("levit_128s"), _image(224), ("image",)),
    Model("bert_no_token_type_ids", _hf(_bert), _tokens(), ("input_ids", "attention_mask")),
    Model("all_minilm_l6_v2", _hf(_minilm), _tokens(), ("input_ids", "attention_mask")),
    Model("distilbert", _hf(_distilbert), _tokens(), ("input_ids", "attention_mask")),
    Model("gpt2_lm_head", _hf(_gpt2), _tokens(False), ("input_ids",),
          ("onnx", "onnx-dynamo", "torch")),
    Model("llama_causal_lm", _hf(_llama), _tokens(False), ("input_ids",), DYNAMO),
    Model("qwen2_causal_lm", _hf(_qwen2), _tokens(False), ("input_ids",), DYNAMO),
    Model("t5_encoder", _hf(_t5_encoder), _tokens(), ("input_ids", "attention_mask")),
    Model("whisper_encoder", _hf(_whisper_encoder), _mel, ("input_features",)),
    Model("vit_model", _hf(_vit), _image(32), ("pixel_values",)),
]


def export_onnx(module: torch.nn.Module, args: tuple, names: tuple[str, ...], dynamo: bool):
    """The ONNX model a user gets from ``torch.onnx.export``."""
    import onnx

    if dynamo:
        pytest.importorskip("onnxscript")
        return torch.onnx.export(module, args, dynamo=True, input_names=list(names),
                                 verbose=False).model_proto
    buf = io.BytesIO()
    torch.onnx.export(module, args, buf, dynamo=False, input_names=list(names),
                      opset_version=17)
    return onnx.load_from_string(buf.getvalue())


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def _build(model: Model) -> torch.nn.Module:
    try:
        return model.build()
    except ModuleNotFoundError as e:  # torchvision / timm not installed
        pytest.skip(f"{model.name}: {e}")


@pytest.mark.parametrize("model,route", [pytest.param(m, r, id=f"{m.name}-{r}")
                                         for m in ZOO for r in m.routes])
def test_model_compiles_and_matches_torch(model: Model, route: str, tmp_path):
    module = _build(model)
    args = model.inputs()
    with torch.no_grad():
        want = module(*args).numpy()
    assert want.std() > 0, "a constant reference output tests nothing"
    feeds = {n: a.numpy() for n, a in zip(model.input_names, args, strict=True)}
    names = list(model.input_names)
    source = module if route == "torch" else \
        export_onnx(module, args, model.input_names, dynamo=route == "onnx-dynamo")
    if route == model.routes[0] or os.environ.get("NPUCC_ZOO_COMPILE_ALL"):
        options = {"example_inputs": args, "input_names": names} if route == "torch" else {}
        compiled = compile(source, work_dir=tmp_path, progress=False, **options)
        (got,) = compiled.run({n: feeds[n] for n in compiled.input_names})
    else:
        graph = from_torch(source, args, input_names=names) if route == "torch" else \
            from_onnx(source)
        (got,) = interpret(graph, {v.name: feeds[v.name] for v in graph.inputs})
    assert relative_error(got, want) <= TOLERANCE


# -- detection: data-dependent post-processing, then the cut at the head outputs --------
HEAD_OUTPUTS = ["/head/regression_head/Concat_12_output_0",
                "/head/classification_head/Concat_12_output_0"]


@pytest.fixture(scope="module")
def ssdlite():
    try:
        tv = import_torchvision()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    model = tv.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None).eval()
    images = [torch.rand(3, 320, 320, generator=torch.Generator().manual_seed(4))]
    buf = io.BytesIO()
    torch.onnx.export(model, (images,), buf, dynamo=False, opset_version=17)
    return model, images, buf.getvalue()


def test_ssdlite_post_processing_is_refused_naming_the_cut(ssdlite):
    import onnx

    _, _, onnx_bytes = ssdlite
    with pytest.raises(ImportError_) as e:
        compile(onnx.load_from_string(onnx_bytes), progress=False)
    msg = str(e.value)
    assert "data-dependent output shapes" in msg and "NonZero" in msg
    assert "outputs=[" in msg


def test_ssdlite_cut_at_the_head_outputs_compiles_and_matches(ssdlite, tmp_path):
    import onnx

    model, images, onnx_bytes = ssdlite
    with torch.no_grad():  # what the head computes, the way SSD.forward calls it
        batch, _ = model.transform(images)
        features = list(model.backbone(batch.tensors).values())
        head = model.head(features)
    compiled = compile(onnx.load_from_string(onnx_bytes), outputs=HEAD_OUTPUTS,
                       work_dir=tmp_path, progress=False)
    boxes, scores = compiled.run({compiled.input_names[0]: images[0].numpy()})
    assert relative_error(boxes, head["bbox_regression"].numpy()) <= TOLERANCE
    assert relative_error(scores, head["cls_logits"].numpy()) <= TOLERANCE
