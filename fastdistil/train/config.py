"""TrainConfig: every setting of python -m fastdistil.train, with the recipe's defaults, its flags and its
checks."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from fastdistil import assets
from fastdistil.commands import check_choices, config_from, device_of, flag, parser_for
from fastdistil.train import data
from fastdistil.train.families import Family

# The length of a run given neither --max-steps nor --epochs: the built-in default run's, under 3 minutes
# on 2 CPU cores.
DEFAULT_MAX_STEPS = 200
DESCRIPTION = ("distill a BERT or RoBERTa masked LM, or a GPT-2 causal LM, into a student of half its depth "
               "(Sanh et al. 2019: DistilBERT, DistilRoBERTa, DistilGPT2)")
# --teacher's names for the teachers fastdistil ships.
BUILT_IN_TEACHERS = {"tiny-bert": assets.TEACHER, "tiny-gpt2": assets.DIR / "tiny-gpt2-teacher"}
DEFAULT_TEACHER = "tiny-bert"
# The weight of the LM term the teacher's family trains with, when neither --alpha-mlm nor --alpha-clm is given.
DEFAULT_ALPHA_LM = 2.0


@dataclass
class TrainConfig:
    # None until main fills in the default: so that --teacher given beside --teacher-cache can be told apart.
    teacher: str | None = flag(None, "a BERT or RoBERTa masked LM or a GPT-2 causal LM: hub name, directory, or a "
                                     f"built-in one (tiny-bert, tiny-gpt2; default: {DEFAULT_TEACHER})")
    teacher_cache: str | None = flag(None, "train against the teacher outputs python -m fastdistil.cache_teacher "
                                           "wrote to this directory (its top-k logits): no teacher is loaded")
    tokenizer: str | None = flag(None, "default: the teacher's")
    dataset: str = flag(data.DEFAULT_DATASET, "wiki-vital (bundled), a .txt/.jsonl file or folder, or a HF dataset")
    dataset_config: str | None = flag(None, "the Hugging Face dataset's config")
    text_column: str = flag("text", "the text field of .jsonl files and datasets")
    streaming: bool = flag(False, "read a Hugging Face dataset as a stream; needs --max-documents")
    max_documents: int | None = flag(None, "use the first documents of the corpus only")
    num_proc: int = flag(1, "tokenizer processes (batches of documents in parallel; fast tokenizers already use "
                            "several cores)")
    output_dir: str = flag("runs/distil", "where the run's files go")
    overwrite: bool = flag(False, "replace what an earlier run left in --output-dir")
    max_steps: int | None = flag(None, f"optimizer steps (default: --epochs if given, else {DEFAULT_MAX_STEPS})")
    epochs: int | None = flag(None, "passes over the data, when --max-steps is not given")
    batch_size: int = flag(8, "sequences per process and micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step and process")
    max_seq_len: int = flag(128, "tokens per sequence, [CLS] and [SEP] included; longer text is chunked")
    # The recipe's 5e-4 was for batches of ~2,000 sequences; at the default batch of 8 it undoes the teacher
    # initialization within the default run.
    lr: float = flag(1e-4, "peak learning rate (the recipe used 5e-4 with batches of ~2,000 sequences)")
    warmup: float = flag(0.05, "linear warm-up, as a fraction of the steps")
    weight_decay: float = flag(0.0, "AdamW weight decay (not on biases and LayerNorms)")
    adam_eps: float = flag(1e-6, "AdamW epsilon")
    max_grad_norm: float = flag(5.0, "gradient clipping")
    temperature: float = flag(2.0, "softmax temperature of the KL term")
    alpha_ce: float = flag(5.0, "weight of the KL (distillation) term")
    alpha_mlm: float | None = flag(None, f"weight of the masked-LM term (default: {DEFAULT_ALPHA_LM} for a masked "
                                         "teacher)")
    alpha_clm: float | None = flag(None, f"weight of the causal-LM term (default: {DEFAULT_ALPHA_LM} for a GPT-2 "
                                         "teacher)")
    alpha_mse: float = flag(0.0, "weight of the MSE between student and teacher logits, over the KL's rows")
    alpha_cos: float = flag(1.0, "weight of the hidden-state cosine term")
    restrict_ce_to_mask: bool = flag(False, "KL over the MLM targets only, not every token")
    mlm_prob: float = flag(0.15, "fraction of real tokens that become MLM targets")
    mlm_smoothing: float = flag(0.7, "targets drawn with probability count^-smoothing")
    student_layers: str | None = flag(None, "teacher layers the student starts from, e.g. 0,2,4,7,9,11")
    vocab_transform: bool = flag(True, "RoBERTa: also copy the LM head's dense layer and LayerNorm "
                                       "(--no-vocab-transform: scripts/extract.py's default, which leaves them "
                                       "freshly initialized)")
    freeze_pos_embs: bool = flag(False, "keep the student's position embeddings as copied from the teacher")
    freeze_token_type_embs: bool = flag(False, "keep the student's token-type embeddings as copied (RoBERTa)")
    student_init: str = flag("teacher", "teacher (the recipe) or random (the ablation)",
                             choices=("teacher", "random"))
    precision: str = flag("fp32", "autocast of the models; the loss is always fp32",
                          choices=("fp32", "bf16", "fp16"))
    attention: str = flag("sdpa", "the student's attention: sdpa (transformers' default), eager, or fastdistil "
                                  "(the fused Triton kernel on sm80+ GPUs, SDPA elsewhere)",
                          choices=("sdpa", "eager", "fastdistil"))
    loss: str = flag("fused", "fused: projection and loss chunk by chunk, no [N, V] logits; fused-logits: "
                              "logits, then the fused loss; reference: logits, then the unfused recipe loss",
                     choices=("fused", "fused-logits", "reference"))
    tail: str = flag("bucket", "with --teacher-cache, the teacher's probability outside its top-k: bucket (one "
                               "more class, against the student's probability there) or renormalize (the top-k "
                               "alone, rescaled to sum to 1)", choices=("bucket", "renormalize"))
    device: str = flag("auto", "cuda when there is a GPU, else cpu", choices=("auto", "cpu", "cuda"))
    save_every: int = flag(0, "optimizer steps between checkpoints; 0: none (SIGTERM still saves one)")
    keep_last: int = flag(3, "checkpoints kept")
    resume: str | None = flag(None, "continue from the newest whole checkpoint in --output-dir, or this one",
                              nargs="?", const="latest", metavar="CHECKPOINT_DIR")
    max_bad_steps: int = flag(10, "consecutive NaN/inf-loss steps (each skipped) before the run stops")
    token_weighted: bool = flag(False, "weight micro-batches and processes by their non-padding tokens")
    log_every: int = flag(10, "optimizer steps between metrics.jsonl records")
    seed: int = flag(56, "seeds batch order, masking, dropout and a random student")
    heldout_fraction: float = flag(0.02, "sequences held out for the final evaluation")
    tensorboard: bool = flag(False, "also log to OUTPUT_DIR/tensorboard")

    @property
    def alpha_lm(self) -> float:
        """The weight of the LM term: --alpha-mlm or --alpha-clm, whichever the teacher trains with (for_family
        zeroes the other), DEFAULT_ALPHA_LM when neither is set."""
        if self.alpha_mlm is None and self.alpha_clm is None:
            return DEFAULT_ALPHA_LM
        return (self.alpha_mlm or 0.0) + (self.alpha_clm or 0.0)


def check_config(cfg: TrainConfig) -> None:
    """A ValueError naming the first bad setting, before anything is read or written."""
    check_values(cfg)
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite and cfg.resume is None:
        raise ValueError(f"--output-dir {out} is not empty; pass --overwrite to replace its contents or "
                         "--resume to continue its run")


def check_values(cfg: TrainConfig) -> None:
    """check_config's checks of the settings themselves, without --output-dir's: those that cache_teacher, which
    writes elsewhere, shares."""
    check_choices(cfg)
    if cfg.teacher_cache is not None and cfg.teacher is not None:
        raise ValueError(f"--teacher-cache {cfg.teacher_cache} and --teacher {cfg.teacher}: give one; a run from a "
                         "cache loads no teacher, and the cache names the one it was made with")
    if cfg.teacher_cache is not None and cfg.alpha_mse:
        raise ValueError(f"--alpha-mse {cfg.alpha_mse} with --teacher-cache: the MSE term needs every teacher "
                         "logit, and a cache holds the top-k only")
    for name in ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_cos", "alpha_mse", "weight_decay"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {cfg.temperature}")
    if not 0 < cfg.mlm_prob < 1:
        raise ValueError(f"--mlm-prob must be in (0, 1), got {cfg.mlm_prob}")
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "num_proc", "max_documents"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.streaming and cfg.max_documents is None:
        raise ValueError("--streaming needs --max-documents: how many documents to read from the stream")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {cfg.max_steps}")
    device_of(cfg.device)
    if cfg.keep_last < 1:
        raise ValueError(f"--keep-last must be >= 1, got {cfg.keep_last}")
    if cfg.max_bad_steps < 0:
        raise ValueError(f"--max-bad-steps must be >= 0, got {cfg.max_bad_steps}")


def with_default_teacher(cfg: TrainConfig) -> TrainConfig:
    """cfg with --teacher's default filled in where neither --teacher nor --teacher-cache is given."""
    if cfg.teacher is None and cfg.teacher_cache is None:
        return dataclasses.replace(cfg, teacher=DEFAULT_TEACHER)
    return cfg


def teacher_path(cfg: TrainConfig) -> str:
    """--teacher as from_pretrained takes it: a built-in teacher's directory, or the name as given."""
    return str(BUILT_IN_TEACHERS.get(cfg.teacher, cfg.teacher))


def for_family(cfg: TrainConfig, family: Family, teacher_config) -> TrainConfig:
    """The config with the LM weights of the teacher's objective filled in, checked against what the teacher's
    family has: a nonzero weight of the other objective, an option only masked LMs have, embeddings the student
    does not have or a sequence longer than the teacher's positions is a ValueError naming the flag. Called
    with the teacher's config, before its weights are loaded."""
    causal = family.causal
    given, other = ("alpha_clm", "alpha_mlm") if causal else ("alpha_mlm", "alpha_clm")
    objective = "a causal LM (GPT-2)" if causal else "a masked LM"
    if getattr(cfg, other):
        raise ValueError(f"--{other.replace('_', '-')} {getattr(cfg, other)}: the teacher is {objective}; "
                         f"its LM term's weight is --{given.replace('_', '-')}")
    if causal and cfg.restrict_ce_to_mask:
        raise ValueError("--restrict-ce-to-mask: a causal teacher has no masked positions to restrict the KL to")
    for asked, embeddings, flag_name in ((cfg.freeze_pos_embs, family.position_embeddings, "pos-embs"),
                                         (cfg.freeze_token_type_embs, family.token_type_embeddings, "token-type-embs")):
        if asked and embeddings is None:
            raise ValueError(f"--freeze-{flag_name}: a {family.name} teacher's student has no such embeddings")
    if cfg.max_seq_len > family.max_positions(teacher_config):
        raise ValueError(f"--max-seq-len {cfg.max_seq_len}: the teacher's position embeddings take at most "
                         f"{family.max_positions(teacher_config)} tokens")
    weight = DEFAULT_ALPHA_LM if getattr(cfg, given) is None else getattr(cfg, given)
    return dataclasses.replace(cfg, **{given: weight, other: 0.0})


def config_file(path: Path) -> dict:
    """The TrainConfig keys of a --config file (YAML or JSON); an unknown key is a ValueError."""
    if not path.exists():
        raise ValueError(f"--config {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {unknown}")
    return values


def parse_args(argv=None) -> TrainConfig:
    """Every TrainConfig field is a flag (--max-steps, --restrict-ce-to-mask, ...); --config FILE (YAML or
    JSON, the same keys) sets defaults that the command line overrides."""
    parser = parser_for(TrainConfig, "python -m fastdistil.train", DESCRIPTION)
    parser.add_argument("--config", type=Path, help="YAML or JSON file with TrainConfig keys")
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    values = config_file(config_path) if config_path is not None else {}
    return config_from(TrainConfig, {**values, **{k: v for k, v in args.items() if v is not None}})
