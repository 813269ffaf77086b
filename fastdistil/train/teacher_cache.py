"""The teacher cache: what python -m fastdistil.cache_teacher writes, and what python -m fastdistil.train
--teacher-cache reads in place of a teacher.

A run's batches and masks are functions of (seed, epoch, batch index) (inputs.TrainingData), so the teacher's
inputs for epochs 0 ... K-1 are known before any training. A cache holds, for every non-padding token of every
batch of those epochs' length-grouped plans, the teacher's top-k raw logits, their indices, the log-sum-exps of
all its logits at T = 1 and at T (ops.reference.teacher_topk: with them the top-k probabilities and the tail
mass are exact), and, when the cosine term is on, its last hidden state. The only approximation left is the
top-k truncation: with k = V the cache is exact. Which micro-batch goes to which step and process is decided
when training, so one cache serves any --grad-accum and any number of processes.

A cache directory holds:
- manifest.json: `params`, all that decides the cache's content (the run flags that decide the teacher's
  inputs, the data's fingerprint, the teacher's identity, k and the dtypes), `epochs`, and, once `complete`,
  every shard with its size and SHA-256, and the bytes per token.
- teacher/: the teacher's config.json and the tokenizer: all that a run from the cache reads of the teacher.
- students/KEY/: each initial student cache_teacher was asked for (save_pretrained), KEY naming its
  --student-init, --student-layers and --vocab-transform: a run from the cache starts from one of them, so that
  it never reads the teacher's weights.
- shards/eEEEE-bBBBBBBBB.safetensors: `shard_batches` consecutive batches of epoch E's plan from batch B on.
  offsets [n + 1] (each batch's first row), digests [n] (batch_digest), topk_logits [rows, k], topk_indices
  [rows, k] (int16 when V <= 32768, else int32), logsumexp [rows, 2] fp32 and, with the cosine term, hidden
  [rows, D]. The rows are the batches' non-padding tokens, in row-major order.
- shards/heldout.safetensors: for the labelled rows of the held-out batches, the teacher's log-probability of
  the label and its top-1: what the held-out metrics need of the teacher (step.teacher_heldout_rows).
- progress/rank-R.jsonl, while a cache is being written: the shards rank R finished, a JSON line each.

Every file is written under a temporary name, fsynced and renamed into place, and a cache_teacher run that was
killed keeps the shards whose checksums verify.
"""

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastdistil.ops.reference import teacher_topk
from fastdistil.train import data, distributed, heads
from fastdistil.train.student import default_student_layers

FORMAT = 1
MANIFEST = "manifest.json"
TEACHER_DIR = "teacher"
STUDENTS_DIR = "students"
SHARDS_DIR = "shards"
PROGRESS_DIR = "progress"
HELDOUT = "heldout.safetensors"
HELDOUT_COLUMNS = ("label_logprob", "top1")  # step.teacher_heldout_rows' pair
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The TrainConfig fields that decide which inputs the teacher sees and what it is asked: a run from a cache must
# have the values the cache was made with.
RUN_FIELDS = ("dataset", "dataset_config", "text_column", "streaming", "max_documents", "tokenizer", "max_seq_len",
              "batch_size", "seed", "mlm_prob", "mlm_smoothing", "heldout_fraction", "temperature")
# Rows of teacher logits projected at a time: bounds the [rows, V] temporary (250 MB at V = 30522 in fp32).
PROJECTION_ROWS = 2048


class TeacherRows(NamedTuple):
    """The teacher's side of the sparse triple loss for one batch's non-padding tokens, in row-major order."""

    topk_logits: torch.Tensor  # [N, k] raw (T = 1) logits, descending
    topk_indices: torch.Tensor  # [N, k] int16 or int32
    logsumexp: torch.Tensor  # [N, 2] fp32: over all V logits at T = 1 and at the cache's temperature
    hidden: torch.Tensor | None  # [N, D] last hidden state; None without the cosine term

    def to(self, device) -> "TeacherRows":
        return TeacherRows(*(None if t is None else t.to(device) for t in self))


@torch.no_grad()
def teacher_rows(teacher: heads.ProjectionInputs, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int,
                 temperature: float, amp_dtype: torch.dtype | None, logits_dtype: torch.dtype,
                 hidden_dtype: torch.dtype | None) -> TeacherRows:
    """What a cache keeps of the teacher on one batch: its forward as train_step runs it (autocast to
    amp_dtype), the logits of the non-padding rows a few at a time, and teacher_topk of them."""
    with torch.autocast(input_ids.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        head_input, hidden = teacher(input_ids, attention_mask)
    real = attention_mask.bool()
    projection = heads.projection(teacher.model)
    weight, bias = projection.weight, projection.bias
    head_input = head_input[real]
    if amp_dtype is not None:  # the cast autocast would apply to the projection, as train_step makes it
        head_input, weight = head_input.to(amp_dtype), weight.to(amp_dtype)
        bias = None if bias is None else bias.to(amp_dtype)
    chunks = [teacher_topk(F.linear(rows, weight, bias), k, temperature) for rows in head_input.split(PROJECTION_ROWS)]
    values, indices, logsumexp = (torch.cat(parts) for parts in zip(*chunks))
    return TeacherRows(values.to(logits_dtype), indices, logsumexp,
                       None if hidden_dtype is None else hidden[real].to(hidden_dtype))


def batch_digest(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
    """64 bits of the SHA-256 of a batch's (masked) ids, mask and labels: a run from a cache checks that each
    batch it trains on is the one whose teacher outputs it is given."""
    digest = hashlib.sha256(str(tuple(input_ids.shape)).encode())
    for tensor in (input_ids, attention_mask, labels):
        digest.update(tensor.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little", signed=True)


def shard_name(epoch: int, first_batch: int) -> str:
    return f"e{epoch:04d}-b{first_batch:08d}.safetensors"


def shard_plan(batches_per_epoch: list[int], shard_batches: int) -> list[dict]:
    """Every shard of a cache, in order: {name, epoch, first_batch, batches}."""
    return [{"name": shard_name(epoch, first), "epoch": epoch, "first_batch": first,
             "batches": min(shard_batches, n - first)}
            for epoch, n in enumerate(batches_per_epoch) for first in range(0, n, shard_batches)]


def run_flags(cfg) -> dict:
    """The RUN_FIELDS of a TrainConfig, by flag."""
    return {"--" + name.replace("_", "-"): getattr(cfg, name) for name in RUN_FIELDS}


def data_fingerprint(run_data) -> dict:
    """What tells that two runs tokenized and split the same corpus the same way."""
    return {"train_sequences": len(run_data.train_set), "heldout_sequences": len(run_data.heldout),
            "train_sha256": data.fingerprint(run_data.train_set), "heldout_sha256": data.fingerprint(run_data.heldout)}


def model_sha256(model: torch.nn.Module) -> dict:
    """SHA-256s of a model's config (without the fields that name where it was loaded from) and of its
    weights (state_dict order)."""
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        weights.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "weights_sha256": weights.hexdigest()}


def student_key(cfg, n_teacher_layers: int) -> str:
    """The name under students/ of the initial student of cfg's --student-init, --student-layers and
    --vocab-transform (and --seed, for a random one)."""
    layers = (default_student_layers(n_teacher_layers) if cfg.student_layers is None else
              [int(i) for i in cfg.student_layers.split(",")])
    key = f"{cfg.student_init}-layers-{'-'.join(str(i) for i in layers)}"
    key += "" if cfg.vocab_transform else "-no-vocab-transform"
    return key + (f"-seed-{cfg.seed}" if cfg.student_init == "random" else "")


def first_difference(made: dict, asked: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """(the first key, nested keys joined by spaces, whose value differs, the value in `made`, the one in
    `asked`), or None where they agree."""
    for key in dict.fromkeys([*made, *asked]):
        a, b = made.get(key), asked.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key} ")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not a teacher cache's manifest (not JSON: {exc})") from exc


def _write_whole(path: Path, blob: bytes) -> None:
    """path holds its old content or all of blob, never part of it, whenever the process or the machine dies."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_manifest(directory: Path, manifest: dict) -> None:
    _write_whole(directory / MANIFEST, json.dumps(manifest, indent=1).encode())


def shard_problem(directory: Path, entry: dict) -> str | None:
    """None if the shard a manifest entry names is whole, else what is wrong with it."""
    path = directory / SHARDS_DIR / entry["name"]
    shown = f"shard {SHARDS_DIR}/{entry['name']}"
    if not path.is_file():
        return f"{shown} is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{shown} is damaged: {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        return f"{shown} is damaged: its SHA-256 differs from the manifest's"
    return None


class CacheWriter:
    """Writes a cache into `directory` as one of the processes of a torchrun launch, each writing the shards
    assigned to it (mine). A directory holding a cache made with the same params is continued: its shards whose
    checksums verify are kept (is_done), the others made again; one made with other params, or anything else, is
    an error unless `overwrite`. Every process calls __init__ and finish."""

    def __init__(self, directory: Path, manifest: dict, procs: distributed.Processes, overwrite: bool):
        self.dir, self.manifest, self.procs = directory, manifest, procs
        existing = read_manifest(directory)
        replace = False
        if existing is not None:
            found = first_difference({"format": existing.get("format"), **existing.get("params", {})},
                                     {"format": FORMAT, **manifest["params"]})
            if found is None and existing["epochs"] > manifest["epochs"]:
                found = ("epochs", existing["epochs"], manifest["epochs"])
            if found is not None and not overwrite:
                key, made, asked = found
                raise ValueError(f"--output-dir {directory} holds a teacher cache made with {key} {made}, this run "
                                 f"has {asked}; pass --overwrite to replace it, or choose another --output-dir")
            replace = found is not None
        elif directory.exists() and any(directory.iterdir()):
            if not overwrite:
                raise ValueError(f"--output-dir {directory} is not empty and holds no teacher cache; pass "
                                 "--overwrite to replace its contents")
            replace = True
        distributed.barrier(procs)  # every process has read the directory before rank 0 changes it
        if procs.is_main:
            if replace:
                shutil.rmtree(directory)
            for name in (SHARDS_DIR, PROGRESS_DIR):
                (directory / name).mkdir(parents=True, exist_ok=True)
            if existing is None or replace:
                write_manifest(directory, manifest)
        distributed.barrier(procs)
        self.entries = {} if existing is None or replace else {e["name"]: e for e in existing.get("shards", [])}
        if existing is not None and not replace and existing.get("heldout"):
            self.entries[HELDOUT] = existing["heldout"]
        self.entries |= self._recorded()
        self.written = 0

    def _recorded(self) -> dict[str, dict]:
        """The shards that the progress logs of this and earlier runs record as written."""
        entries = {}
        for log in sorted((self.dir / PROGRESS_DIR).glob("rank-*.jsonl")):
            for line in log.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # the line a kill cut short: its shard is made again
                    break
                entries[entry["name"]] = entry
        return entries

    def mine(self, shards: list[dict]) -> list[str]:
        """The names of the shards this process writes, of shard_plan's list and the held-out shard."""
        return ([s["name"] for s in shards] + [HELDOUT])[self.procs.rank::self.procs.world_size]

    def is_done(self, name: str) -> bool:
        """Whether shard `name` is in place and verifies; one that does not is made again, with a warning."""
        if name not in self.entries:
            return False
        problem = shard_problem(self.dir, self.entries[name])
        if problem is not None:
            warnings.warn(f"teacher cache {self.dir}: {problem}; making it again", stacklevel=2)
            del self.entries[name]
        return problem is None

    def write(self, name: str, tensors: dict[str, torch.Tensor], **details) -> None:
        """Writes shard `name` whole and records it in this process's progress log."""
        blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
        _write_whole(self.dir / SHARDS_DIR / name, blob)
        entry = {"name": name, **details, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        with open(self.dir / PROGRESS_DIR / f"rank-{self.procs.rank:05d}.jsonl", "a") as log:
            log.write(json.dumps(entry) + "\n")
            log.flush()
            os.fsync(log.fileno())
        self.entries[name] = entry
        self.written += 1

    def finish(self, shards: list[dict]) -> dict:
        """The complete manifest, written by rank 0 once every process has written its shards (`shards`:
        shard_plan's list; the held-out one besides); the progress logs go."""
        # Each process vouches for its own shards only: another's entry for one of them may predate its remaking.
        mine = {name: self.entries[name] for name in self.mine(shards) if name in self.entries}
        gathered = {name: entry for part in distributed.gather(mine, self.procs) for name, entry in part.items()}
        manifest = dict(self.manifest)
        if self.procs.is_main:
            missing = [s["name"] for s in shards if s["name"] not in gathered] + (
                [] if HELDOUT in gathered else [HELDOUT])
            if missing:
                raise RuntimeError(f"teacher cache {self.dir}: no process wrote {missing[0]}")
            tokens = sum(gathered[s["name"]]["rows"] for s in shards)
            size = sum(gathered[s["name"]]["bytes"] for s in shards)
            manifest |= {"complete": True, "shards": [gathered[s["name"]] for s in shards],
                         "heldout": gathered[HELDOUT], "tokens": tokens, "bytes": size,
                         "bytes_per_token": size / max(tokens, 1)}
            write_manifest(self.dir, manifest)
            shutil.rmtree(self.dir / PROGRESS_DIR)
        distributed.barrier(self.procs)
        return manifest


def save_whole(final: Path, *models) -> None:
    """final/ holding each of `models` (anything with save_pretrained: a model, its config, a tokenizer), saved
    under a temporary name and renamed into place; left as it is where it is already there."""
    if final.is_dir():
        return
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for model in models:
        model.save_pretrained(tmp)
    os.replace(tmp, final)


def pack(batches: list[dict[str, torch.Tensor]], digests: list[int]) -> dict[str, torch.Tensor]:
    """A shard's tensors: each batch's rows ({name: [rows, ...]}, the same names for all) one after the other,
    with the offsets of each batch's first row and the batches' digests."""
    names = list(batches[0])
    rows = torch.tensor([0] + [len(batch[names[0]]) for batch in batches], dtype=torch.int64)
    return {"offsets": rows.cumsum(0), "digests": torch.tensor(digests, dtype=torch.int64),
            **{name: torch.cat([batch[name] for batch in batches]) for name in names}}


class TeacherCache:
    """A complete cache opened for a training run (cfg.teacher_cache): checked against the run's flags, its data
    and the epochs it needs before anything is trained, then read batch by batch in place of the teacher."""

    def __init__(self, cfg):
        self.dir = Path(cfg.teacher_cache)
        self.flag = f"--teacher-cache {self.dir}"
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise ValueError(f"{self.flag}: no {MANIFEST}; python -m fastdistil.cache_teacher --output-dir "
                             f"{self.dir} makes a teacher cache")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{self.flag}: cache format {manifest.get('format')}, this fastdistil reads {FORMAT}")
        if not manifest.get("complete"):
            raise ValueError(f"{self.flag} is incomplete (its cache_teacher run stopped before the end); run "
                             "python -m fastdistil.cache_teacher again with the same flags to finish it")
        self.manifest, self.params = manifest, manifest["params"]
        found = first_difference(self.params["run"], run_flags(cfg))
        if found is not None:
            flag, made, asked = found
            raise ValueError(f"{self.flag} was made with {flag} {made}, this run has {flag} {asked}")
        if cfg.alpha_cos > 0 and self.params["hidden_dtype"] is None:
            raise ValueError(f"--alpha-cos {cfg.alpha_cos}: {self.flag} holds no teacher hidden states (it was made "
                             "with --alpha-cos 0); pass --alpha-cos 0 or make a cache with the cosine term on")
        if not 1 <= self.params["top_k"] <= self.params["vocab_size"]:
            raise ValueError(f"{self.flag}: its top_k {self.params['top_k']} is not in [1, V = "
                             f"{self.params['vocab_size']}]")
        self.teacher = self.params["teacher"]
        self._open = (None, None)

    def check_data(self, run_data, epochs: int) -> None:
        """A ValueError unless the run's tokenized data are the cache's and the cache holds `epochs` epochs."""
        found = first_difference(self.params["data"], data_fingerprint(run_data))
        if found is not None:
            key, made, asked = found
            raise ValueError(f"{self.flag}: the run's data differ from the cache's ({key}: {made} in the cache, "
                             f"{asked} in this run); the corpus or the tokenizer changed")
        if epochs > self.manifest["epochs"]:
            raise ValueError(f"{self.flag} holds {self.manifest['epochs']} epoch(s) of teacher outputs and this run "
                             f"needs {epochs}; python -m fastdistil.cache_teacher --epochs {epochs} with the cache's "
                             "flags extends it")

    def verify(self, epochs: int, procs: distributed.Processes) -> None:
        """Checks the size and SHA-256 of every shard that a run of `epochs` epochs reads, and of the held-out
        one, the processes sharing the work: a ValueError naming the first bad one, on every process."""
        entries = [e for e in self.manifest["shards"] if e["epoch"] < epochs] + [self.manifest["heldout"]]
        mine = entries[procs.rank::procs.world_size]
        problems = [shard_problem(self.dir, e) for e in tqdm(mine, desc="verifying the teacher cache", unit=" shards",
                                                             disable=not procs.is_main)]
        problems = [p for part in distributed.gather([p for p in problems if p], procs) for p in part]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(f"{self.flag}: {problems[0]}{more}; nothing was trained. Run python -m "
                             "fastdistil.cache_teacher again with the cache's flags to make it again")

    def student(self, cfg, family, teacher_config) -> torch.nn.Module:
        """The initial student cache_teacher saved for cfg's student flags (on the CPU, fp32)."""
        key = student_key(cfg, teacher_config.num_hidden_layers)
        path = self.dir / STUDENTS_DIR / key
        if not path.is_dir():
            held = sorted(p.name for p in (self.dir / STUDENTS_DIR).glob("[!.]*"))
            raise ValueError(f"{self.flag} holds no initial student {key} (--student-init, --student-layers, "
                             f"--vocab-transform; it holds {', '.join(held) or 'none'}); python -m "
                             "fastdistil.cache_teacher with the cache's flags and these adds it, without running the "
                             "teacher again")
        return family.student_class.from_pretrained(path, dtype=torch.float32)

    def _shard(self, name: str):
        if self._open[0] != name:
            self._open = (name, safetensors.safe_open(self.dir / SHARDS_DIR / name, framework="pt"))
        return self._open[1]

    def _batch_rows(self, shard, position: int, batch, what: str) -> tuple[int, int]:
        """The rows of the shard's batch `position`, checked to be the batch the run trains on."""
        if shard.get_slice("digests")[position:position + 1].item() != batch_digest(*batch):
            raise ValueError(f"{self.flag}: {what} is not the batch the cache's teacher outputs were made for (a "
                             "different torch may draw other masks)")
        start, end = shard.get_slice("offsets")[position:position + 2].tolist()
        return start, end

    def rows(self, epoch: int, index: int, batch, device) -> TeacherRows:
        """The teacher's rows for batch `index` of the epoch's plan: batch = its (input_ids, attention_mask,
        labels), checked against the batch the cache was made for."""
        first = index - index % self.params["shard_batches"]
        shard = self._shard(shard_name(epoch, first))
        start, end = self._batch_rows(shard, index - first, batch, f"batch {index} of epoch {epoch}")
        hidden = shard.get_slice("hidden")[start:end] if self.params["hidden_dtype"] else None
        return TeacherRows(*(shard.get_slice(name)[start:end] for name in ("topk_logits", "topk_indices",
                                                                            "logsumexp")), hidden).to(device)

    def heldout_rows(self, index: int, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """step.teacher_heldout_rows of held-out batch `index`, as the cache keeps it."""
        shard = self._shard(HELDOUT)
        start, end = self._batch_rows(shard, index, (input_ids, attention_mask, labels), f"held-out batch {index}")
        return tuple(shard.get_slice(name)[start:end].to(labels.device) for name in HELDOUT_COLUMNS)

