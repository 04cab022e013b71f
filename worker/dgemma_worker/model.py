"""Loading DiffusionGemma checkpoints: the small trained one that ships with the package (the default), any
checkpoint directory or hub id, and the tiny random-weight one that tests needing exact control write."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dgemma_common.dtypes import QUANTIZED, dtype_problem
from dgemma_common.images import VisionSpec

from .checkpoints import BUNDLED_MODEL_DIR

log = logging.getLogger(__name__)

# Gemma's special tokens, in the order the tiny tokenizer gives them ids 0..N.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<start_of_audio>",
    "<end_of_audio>",
    "<audio_soft_token>",
    "<|video|>",
)
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
END_OF_TURN = "<end_of_turn>"
# The multimodal tokens by the names transformers' Gemma 4 processor reads from the tokenizer.
MULTIMODAL_TOKENS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "audio_token": "<audio_soft_token>",
    "boa_token": "<start_of_audio>",
    "eoa_token": "<end_of_audio>",
}

# Gemma's turns; a message's content is a string, or a list of text and image parts as chat templates take
# them (`{"type": "image"}` becomes the image token, which the processor expands into the image's soft tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image_soft_token>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# The tiny model's image processor: Gemma 4's, with its smallest soft-token budget.
TINY_MAX_SOFT_TOKENS = 70
# Bumped whenever the tiny checkpoint's files change shape (v2: multimodal tokens and a processor config).
TINY_LAYOUT = "v2"

# A small, fixed corpus so the byte-level BPE merges are deterministic and look like text.
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Diffusion models denoise a canvas of tokens step by step. "
    "Gemma is a family of open models. A block diffusion model writes a whole block of text at once, "
    "then the next block. Kubernetes runs the workers; the gateway routes each request to the cheapest "
    "worker that meets its latency target. Hello, world! What is the capital of France? Paris is. "
    "Why is the sky blue? Because of Rayleigh scattering of sunlight in the atmosphere. "
    "def main():\n    print('hello')\n\nfor i in range(10):\n    total += i\n"
)

# The checkpoint's sampling settings (generation_config.json) that requests inherit unless they set their own.
GENERATION_DEFAULTS = ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class TinyModelSpec:
    """Dimensions of the tiny checkpoint; the defaults give a ~1 MB model with a 16-token canvas."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 32
    intermediate_size: int = 128
    num_experts: int = 2
    top_k_experts: int = 1
    moe_intermediate_size: int = 32
    canvas_length: int = 16
    bpe_vocab_size: int = 384
    sliding_window: int = 128
    model_vocab_size: int | None = None  # a larger embedding than the tokenizer needs (benchmarks)
    full_attention_every: int = 0  # the real checkpoint's 5 sliding : 1 full is 6; 0 = only the last is full


@dataclass
class LoadedModel:
    """A model ready for the engine: weights, tokenizer and what to report about them."""

    model: Any
    tokenizer: Any
    name: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    processor: Any = None  # the checkpoint's text-and-image processor; None: the model takes no images

    @property
    def vision(self) -> VisionSpec | None:
        """The image geometry a gateway counts tokens with; None when the model takes no images."""
        from .vision import vision_spec

        return None if self.processor is None else vision_spec(self.processor)

    @property
    def canvas_length(self) -> int:
        return int(self.model.config.canvas_length)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.text_config.vocab_size)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)

    @property
    def pad_token_id(self) -> int | None:
        pad = self.model.generation_config.pad_token_id
        return None if pad is None else int(pad)

    def generation_defaults(self) -> dict[str, Any]:
        """The sampling settings the checkpoint's generation_config sets, as GenerationParams fields."""
        return checkpoint_defaults(self.model.generation_config)


def checkpoint_defaults(generation_config: Any) -> dict[str, Any]:
    """The settings a DiffusionGemmaGenerationConfig sets (unset ones are left to the published defaults)."""
    out = {name: getattr(generation_config, name, None) for name in GENERATION_DEFAULTS}
    sampler = getattr(generation_config, "sampler_config", None)
    out["entropy_bound"] = getattr(sampler, "entropy_bound", None)
    return {name: value for name, value in out.items() if value is not None}


def bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE with Gemma's special tokens (ids 0..9), trained on `texts` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def fast_tokenizer(raw: Any) -> Any:
    """A transformers tokenizer around a `tokenizers` BPE: Gemma's special tokens, chat template, left padding."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        additional_special_tokens=list(SPECIAL_TOKENS[5:]),
        extra_special_tokens=MULTIMODAL_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def layer_types(spec: TinyModelSpec) -> list[str]:
    """Sliding-window layers with full-attention ones every `full_attention_every` (always the last)."""
    every = spec.full_attention_every
    kinds = ["full_attention" if every and (i + 1) % every == 0 else "sliding_attention"
             for i in range(spec.num_hidden_layers)]
    kinds[-1] = "full_attention"
    return kinds


def tiny_config(spec: TinyModelSpec, vocab_size: int) -> Any:
    """A DiffusionGemmaConfig for the tiny checkpoint (with a tiny vision tower, see the notes)."""
    from transformers import DiffusionGemmaConfig
    from transformers.models.diffusion_gemma import DiffusionGemmaTextConfig
    from transformers.models.gemma4 import Gemma4VisionConfig

    text = DiffusionGemmaTextConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        global_head_dim=spec.head_dim,  # type: ignore[call-arg]  # consumed by __post_init__
        num_experts=spec.num_experts,
        top_k_experts=spec.top_k_experts,
        moe_intermediate_size=spec.moe_intermediate_size,
        sliding_window=spec.sliding_window,
        layer_types=layer_types(spec),
        max_position_embeddings=8192,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    vision = Gemma4VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        # One patch position per row and column: the processor makes up to 3 x 210 patches of a long, thin image.
        position_embedding_size=256,
    )
    image_ids = [SPECIAL_TOKENS.index(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")]
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        canvas_length=spec.canvas_length,
        boi_token_id=image_ids[0],
        eoi_token_id=image_ids[1],
        image_token_id=image_ids[2],
    )


def make_tiny_model(path: Path | str, seed: int = 0, spec: TinyModelSpec | None = None) -> Path:
    """Write a small random-weight DiffusionGemma checkpoint and tokenizer to `path` (deterministic per seed)."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig

    spec = spec or TinyModelSpec()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = fast_tokenizer(bpe_tokenizer([_CORPUS] * 4, spec.bpe_vocab_size))
    # Round up, as real checkpoints pad the embedding; ids the tokenizer lacks decode to nothing.
    vocab_size = spec.model_vocab_size or -(-len(tokenizer) // 64) * 64
    config = tiny_config(spec, vocab_size)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    model.generation_config = DiffusionGemmaGenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, SPECIAL_TOKENS.index(END_OF_TURN)],
        pad_token_id=PAD_ID,
        max_denoising_steps=8,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_processor_config(out)
    (out / "dgemma-tiny.json").write_text(json.dumps({"seed": seed, "spec": spec.__dict__}, indent=1))
    return out


def save_processor_config(path: Path, max_soft_tokens: int = TINY_MAX_SOFT_TOKENS) -> None:
    """Write the processor_config.json that makes a checkpoint with the tiny tokenizer's tokens take images.

    It is what `Gemma4Processor.save_pretrained` writes (image processor, audio feature extractor, video
    processor); written by hand because transformers builds the Gemma 4 video processor only with torchvision.
    """
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    image = json.loads(Gemma4ImageProcessorPil(max_soft_tokens=max_soft_tokens).to_json_string())
    image["image_processor_type"] = "Gemma4ImageProcessor"
    config = {
        "processor_class": "Gemma4Processor",
        "image_processor": image,
        "feature_extractor": json.loads(Gemma4AudioFeatureExtractor().to_json_string()),
        "video_processor": {"video_processor_type": "Gemma4VideoProcessor", "max_soft_tokens": max_soft_tokens},
        "image_seq_length": max_soft_tokens,
    }
    (path / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def tiny_model_dir() -> Path:
    """The tiny random-weight model for tests, made on first use in the cache (DGEMMA_TINY_MODEL_DIR overrides)."""
    env = os.environ.get("DGEMMA_TINY_MODEL_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dgemma"
    # A new layout of the tiny model goes to a new folder (same basename: it is the served model name), so a
    # cache written by an older version is never read as the current one.
    target = base / TINY_LAYOUT / "tiny-diffusiongemma" if not env else base
    if all((target / name).exists() for name in ("config.json", "tokenizer.json", "processor_config.json")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent first uses never see a half-written model.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        make_tiny_model(Path(tmp) / "model")
        try:
            os.replace(Path(tmp) / "model", target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    return target


def resolve_device(device: str | None) -> torch.device:
    """An explicit device, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """An explicit dtype, else bf16 on CUDA and fp32 on CPU (bf16 is ~30x slower on these CPUs)."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype in QUANTIZED:
        return torch.bfloat16  # the compute dtype around the quantized weights
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype: must be one of {sorted([*DTYPES, *QUANTIZED])} or 'auto', got {dtype!r}") from None


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of `device`, None for a device that is not a CUDA GPU."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor)


def quantization_for(dtype: str | None, capability: tuple[int, int] | None, checkpoint_quantized: bool) -> Any:
    """The transformers quantization config that `dtype` asks for, or None (plain weights, or pre-quantized).

    fp8 and nvfp4 weights are quantized at load by torchao (`TorchAoConfig`): every linear layer of the
    model and the MoE experts' 3-D weights (`FqnToConfig` names them; by default torchao only sees
    `nn.Linear`), with dynamic per-row (fp8) or per-16-block (nvfp4) activation scales. The router, the
    embedding/LM head and the vision tower stay in bf16. Raises ValueError where the GPU cannot run it.
    """
    if dtype not in QUANTIZED or checkpoint_quantized:
        return None
    problem = dtype_problem(dtype, capability, "this worker's device")
    if problem is not None:
        raise ValueError(f"dtype: {problem}")
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig

    weights = torchao_config(dtype)
    return TorchAoConfig(
        FqnToConfig({LINEAR_WEIGHTS: weights, EXPERT_WEIGHTS: weights}),
        modules_to_not_convert=list(NOT_QUANTIZED),
    )


# Attention projections and the dense / self-conditioning MLPs (nn.Linear modules).
LINEAR_WEIGHTS = r"re:.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The MoE experts keep their weights as 3-D parameters, not nn.Linear modules: named for torchao.
EXPERT_WEIGHTS = r"re:.*\.experts\.(gate_up_proj|down_proj)"
# Kept in bf16: the router decides which experts run (fp8 rounding there changes routing), the tied
# embedding / LM head sets the logits' precision, and the vision tower is small.
NOT_QUANTIZED = ("router", "embed_tokens", "lm_head", "vision_tower", "embed_vision")


def torchao_config(dtype: str) -> Any:
    """torchao's weight config for a quantized dtype (imported only when a quantized dtype is used)."""
    if dtype == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        # Per-row scales: the only granularity torchao's Float8 grouped GEMM (the experts) accepts.
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if dtype == "nvfp4":
        from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig

        # The MoE experts' FP4 grouped GEMM quantizes activations with MSLK's kernels, which PyPI does not
        # carry: the worker image builds them in (images/worker/Dockerfile).
        if importlib.util.find_spec("mslk") is None:
            raise ValueError(
                "dtype: nvfp4 needs the MSLK kernels for the MoE experts, and this environment has no 'mslk' "
                "package (PyPI does not carry it): build the worker image with --build-arg MSLK_SOURCE=... "
                "(images/worker/Dockerfile, docs/engine.md), or serve bf16 or fp8"
            )
        return NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=False)
    raise ValueError(f"dtype: {dtype} is not a quantized dtype")


# The MoE experts implementation, on every device: `grouped_mm`, transformers' own default (what a plain
# `generate()` gets). On CUDA it is one grouped GEMM per projection with no host syncs (`eager` loops over
# the experts hit, with a `nonzero` and a sync per expert: thousands per step at 128 experts), and a
# compiled step's single graph cannot hold that loop either. On a CPU (torch 2.13) it timed the forward
# ~3-10% faster than `eager` on bench_engine.py's model (docs/benchmarks.md).
EXPERTS = "grouped_mm"


def load_model(
    model: str | Path | None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    name: str | None = None,
    experts: str = EXPERTS,
) -> LoadedModel:
    """Load a checkpoint from a directory or a Hugging Face id (HF_HUB_OFFLINE is respected).

    Weights go straight to the device (`device_map`): no full copy passes through host memory.
    `experts` is transformers' experts implementation (benchmarks compare them).
    """
    from transformers import AutoConfig, AutoTokenizer, DiffusionGemmaForBlockDiffusion

    source = str(model) if model else str(BUNDLED_MODEL_DIR)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    config = AutoConfig.from_pretrained(source, **kwargs)
    quantization = quantization_for(
        dtype, device_capability(dev), getattr(config, "quantization_config", None) is not None
    )
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    log.info("loading %s on %s as %s (weights: %s)", source, dev, torch_dtype, dtype or "auto")
    tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k == "revision"})
    net = DiffusionGemmaForBlockDiffusion.from_pretrained(
        source, dtype=torch_dtype, device_map=str(dev), experts_implementation=experts, **kwargs
    ).eval()
    net.requires_grad_(False)
    if net.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        net.generation_config.pad_token_id = tokenizer.pad_token_id
    if net.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        net.generation_config.eos_token_id = tokenizer.eos_token_id
    served = name or Path(source.rstrip("/")).name
    from .vision import load_processor

    processor = load_processor(source, revision)
    if processor is None:
        log.warning("%s has no image processor config: this worker serves text only", source)
    return LoadedModel(
        model=net,
        tokenizer=tokenizer,
        name=served,
        revision=revision or getattr(net.config, "_commit_hash", None) or "local",
        device=dev,
        dtype=torch_dtype,
        processor=processor,
    )
