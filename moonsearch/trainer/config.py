"""Training configuration: a frozen dataclass, YAML presets, and the resolved copy saved in every run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml
from moonsearch.errors import MissingFile, UserError

PRESETS = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class TrainConfig:
    model: str = field(default="moon-mini-base", metadata={"help": "encoder to start from (registry name): "
                                                           "moon-mini-base, moon-tiny, moon:..., clip-mini, clip:..."})
    model_options: dict = field(default_factory=dict, metadata={
        "help": "MoonConfig overrides for an untrained builtin model, e.g. {use_moe: false} or {moe: {guided: false}}"})
    data: str = field(default="demo", metadata={"help": "folder with catalog.parquet and behavior.parquet"})
    out: str = field(default="runs", metadata={"help": "runs folder; the run goes to <out>/<run_name>"})
    run_name: str = field(default="moon-mini-cpu", metadata={"help": "run folder name (resumes if it exists)"})
    steps: int = field(default=60, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "global batch (queries), split over ranks"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    new_lr_scale: float = field(default=1.0, metadata={
        "help": "lr multiplier for parts trained from scratch (projector, projection head, gates)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup: int = field(default=5, metadata={"help": "linear warm-up steps, then cosine to zero"})
    clip: float = field(default=1.0, metadata={"help": "gradient norm clipping (0: off)"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (initial, if learnable)"})
    learnable_temperature: bool = field(default=False, metadata={"help": "learn log(1/t)"})
    symmetric: bool = field(default=False, metadata={"help": "add the product -> query direction"})
    in_batch: bool = field(default=True, metadata={"help": "other queries' positives are negatives"})
    hard_negatives: bool = field(default=True, metadata={"help": "one same-category product per query"})
    hard_negative_index: str = field(default="", metadata={
        "help": "an index folder: hard negatives are each positive's nearest same-category products there"})
    hard_negative_k: int = field(default=20, metadata={"help": "neighbours to draw index hard negatives from"})
    gather: bool = field(default=True, metadata={"help": "products from every rank (all-gather)"})
    queue_size: int = field(default=64, metadata={"help": "past-step products kept as negatives (0: off)"})
    mask_groups: bool = field(default=True, metadata={"help": "mask negatives sharing the positive's group"})
    field_dropout: float = field(default=0.0, metadata={
        "help": "chance that a training product loses its category and attributes (robust to missing fields)"})
    served_loss: bool = field(default=False, metadata={
        "help": "score the loss on the vector as served: the trained part inside the encoder's fixed visual and "
                "text blocks, so it learns what they miss (default: the trained part alone)"})
    distill_weight: float = field(default=0.0, metadata={
        "help": "MOON: weight of a distillation term pulling the trained text side's batch similarities (query "
                "texts and product texts, encoded without pictures) toward MiniLM's (KL, UniME-style; 0: off)"})
    distill_temperature: float = field(default=0.05, metadata={"help": "temperature of the distillation softmaxes"})
    distill_image_weight: float = field(default=0.0, metadata={
        "help": "MOON: weight of a distillation term pulling the trained image side's batch similarities (the "
                "step's products' main pictures and query photos, each encoded alone as a photo query) toward the "
                "visual block's EfficientNet tower (KL at distill_temperature; 0: off)"})
    distill_texts: str = field(default="", metadata={
        "help": "outside texts for the distillation term: a UTF-8 file (one text per line) or 'wide-pool-names' "
                "(the real-artwork wide pool's names, the fit split's product names left out)"})
    distill_extra: int = field(default=32, metadata={"help": "outside texts drawn into each step's distillation batch"})
    aux_weight: float = field(default=0.01, metadata={"help": "weight of the MoE load-balancing loss"})
    modality_mix: tuple[int, int, int] = field(default=(12, 3, 2), metadata={"help": "text : image : text+image"})
    val_fraction: float = field(default=0.1, metadata={"help": "latest share of training pairs held out"})
    val_pool: int = field(default=200, metadata={"help": "products in the validation candidate pool"})
    val_every: int = field(default=20, metadata={"help": "validate every N steps (0: only at the end)"})
    ckpt_every: int = field(default=20, metadata={"help": "checkpoint every N steps"})
    trainable: str = field(default="experts", metadata={"help": "experts | experts+lora | all"})
    lora_rank: int = field(default=0, metadata={"help": "peft LoRA rank on attention (with experts+lora)"})
    strategy: str = field(default="ddp", metadata={
        "help": "with several ranks: ddp (replicated weights, gradients all-reduced) or fsdp (sharded)"})
    mixed_precision: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on CPU)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute decoder-layer activations in backward (a large backbone's activations fit; ~30% slower)"})
    seed: int = field(default=0, metadata={"help": "data order, hard negatives and init"})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modality_mix"] = list(self.modality_mix)
        d["model_options"] = dict(self.model_options)
        return d


def _read(src: Path) -> dict:
    """A YAML preset or config; ``inherit: <preset>`` starts from that preset."""
    if not src.exists():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise MissingFile(f"no preset or config {src} (presets: {known})")
    values = yaml.safe_load(src.read_text()) or {}
    parent = values.pop("inherit", None)
    return _merge(_read(PRESETS / f"{parent}.yaml") if parent else {}, values)


def _merge(base: dict, values: dict) -> dict:
    """Later values win; model_options merge key by key (an ablation adds to its parent's options),
    and an empty ``model_options: {}`` clears them."""
    out = {**base, **values}
    if base.get("model_options") and values.get("model_options"):
        out["model_options"] = {**base["model_options"], **values["model_options"]}
    return out


def load_config(preset: str | None = None, path: str | Path | None = None, **overrides) -> TrainConfig:
    """Defaults <- preset YAML (by name) <- YAML file <- keyword overrides (None values ignored)."""
    values: dict = {}
    for src in ([PRESETS / f"{preset}.yaml"] if preset else []) + ([Path(path)] if path else []):
        values = _merge(values, _read(src))
    values = _merge(values, {k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise UserError(f"unknown training config keys: {', '.join(sorted(unknown))}")
    if "modality_mix" in values:
        values["modality_mix"] = tuple(values["modality_mix"])
    defaults = TrainConfig()
    for k, v in values.items():  # YAML reads 1e-3 as a string: coerce to the field's type, or say which key
        want = type(getattr(defaults, k))
        if want in (int, float) and not isinstance(v, bool) and not isinstance(v, want):
            try:
                f = float(v)
                if want is int and f != int(f):
                    raise ValueError
                values[k] = want(f)
            except (TypeError, ValueError):
                raise UserError(f"training config {k}: expected {want.__name__}, got {v!r}") from None
        elif want is bool and not isinstance(v, bool):
            raise UserError(f"training config {k}: expected true or false, got {v!r}")
    return replace(defaults, **values)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))
