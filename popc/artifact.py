"""Where an export lives on disk, and the ``popc.json`` that says what it holds.

An export is a directory with ``model.onnx`` (+ ``model.onnx.data``), the tokenizer
files and ``popc.json``. Users may also name the ``.onnx`` file itself; every
command accepts either form.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popc.errors import PopcError

CONFIG_NAME = "popc.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# The key by which a tokenizer or model config names Python classes shipped beside it, for
# transformers to import: popc never runs code from a model or an export.
CUSTOM_CODE_KEY = "auto_map"
DEFAULT_MODEL_FILE = "model.onnx"
GENAI_CONFIG_NAME = "genai_config.json"
# The files a transformers tokenizer may save (``save_pretrained``): with the model file, its
# data file, popc.json and genai_config.json, everything an export holds.
TOKENIZER_FILES = frozenset({
    TOKENIZER_CONFIG_NAME, "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "spiece.model", "spm.model",
    "sentencepiece.model", "sentencepiece.bpe.model", "tiktoken.model", "vocab.json", "merges.txt", "vocab.txt",
})  # fmt: skip
CHAT_TEMPLATES_DIRECTORY = "additional_chat_templates"  # one .jinja file per named template
FORMAT_NAME = "popc-export"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExportLocation:
    """The directory of an export and the name of its ONNX file inside it."""

    directory: Path
    model_file: str
    # True for `--out DIR` (the export is the whole directory and is swapped in one
    # rename); False for `--out dir/name.onnx`, whose files join what is already there.
    owns_directory: bool = True

    @property
    def model_path(self) -> Path:
        return self.directory / self.model_file

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_NAME


def location_for_output(out: str | Path) -> ExportLocation:
    """``--out DIR`` or ``--out path/name.onnx`` -> where the export will be written."""
    out = Path(out)
    if out.suffix == ".onnx":
        return ExportLocation(out.parent, out.name, owns_directory=not out.parent.exists())
    return ExportLocation(out, DEFAULT_MODEL_FILE, owns_directory=True)


def export_file_names(model_file: str, *, with_genai: bool = True) -> frozenset[str]:
    """Every name an export with ``model_file`` may hold (the chat-templates folder aside)."""
    names = {model_file, model_file + ".data", CONFIG_NAME, *TOKENIZER_FILES}
    return frozenset(names | {GENAI_CONFIG_NAME} if with_genai else names)


def foreign_entries(directory: Path, model_file: str) -> list[str]:
    """Names in ``directory`` that an export with ``model_file`` does not hold: what
    replacing the directory would delete although popc did not write it."""
    known = export_file_names(model_file)
    foreign = []
    for entry in sorted(directory.iterdir()):
        if entry.name == CHAT_TEMPLATES_DIRECTORY and entry.is_dir() and not entry.is_symlink():
            if all(p.is_file() and p.suffix == ".jinja" for p in entry.iterdir()):
                continue
        elif entry.name in known and (entry.is_symlink() or not entry.is_dir()):
            continue
        foreign.append(entry.name)
    return foreign


MAX_CONFIG_BYTES = 1 << 20


def is_plain_file_name(name: object) -> bool:
    """A name of a file directly inside a directory: no separators, not '.' or '..'."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        return False
    return not any(separator in name for separator in ("/", "\\", "\0"))


def _integer(minimum: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _is(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, kind)


# popc.json's schema: key -> (check, what the value must be, required). Readers may then
# index these keys without further checks. Keys not listed are descriptive only.
CONFIG_SCHEMA: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "format_version": (_integer(1), "an integer", True),
    "model_file": (is_plain_file_name, "a file name inside the export", False),
    "num_layers": (_integer(1), "an integer >= 1", True),
    "num_kv_heads": (_integer(1), "an integer >= 1", True),
    "head_dim": (_integer(1), "an integer >= 1", True),
    "vocab_size": (_integer(1), "an integer >= 1", True),
    "max_positions": (_integer(2), "an integer >= 2", True),
    "eos_token_ids": (_list_of(_integer(0)), "a list of token ids", False),
    "pad_token_id": (_optional(_integer(0)), "a token id or null", False),
    "source": (_is(str), "a string", False),
    "family": (_optional(_is(str)), "a string", False),
    "model_type": (_optional(_is(str)), "a string", False),
    "input_names": (_list_of(_is(str)), "a list of strings", False),
    "output_names": (_list_of(_is(str)), "a list of strings", False),
    "versions": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), "an object of strings", False),
    "pop": (_optional(_is(dict)), "an object or null", False),
    "prefill_skip": (_optional(_is(dict)), "an object or null", False),
    "ort_fusions": (_optional(_is(dict)), "an object or null", False),
    "drop_layers": (_optional(_integer(1)), "an integer >= 1 or null", False),
    "quant": (_optional(_is(dict)), "an object or null", False),
    "kv_eviction": (_optional(_is(dict)), "an object or null", False),
}  # fmt: skip
POP_SCHEMA: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "retain": (_fraction, "a fraction in [0, 1]", True),
    "candidate": (_fraction, "a fraction in [0, 1]", True),
    "keep": (_fraction, "a fraction in [0, 1]", True),
    "intermediate_size": (_integer(1), "an integer >= 1", True),
    "weight_layout": (_is(str), "a string", False),
}
KV_EVICTION_SCHEMA: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "window": (_integer(1), "an integer >= 1", True),
}
QUANT_SCHEMA: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "scheme": (lambda v: v in ("int4", "int8"), "int4 or int8", True),
    "bits": (lambda v: v in (4, 8), "4 or 8", True),
    "block_size": (_integer(16), "an integer >= 16", True),
    "accuracy_level": (_integer(0), "an integer >= 0", True),
}


def check_config(config: Any, config_path: Path) -> None:
    """Validate a parsed popc.json against ``CONFIG_SCHEMA``, naming the first key that is wrong."""
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise PopcError(f"{config_path} was not written by popc; re-run `popc export`")
    version = config.get("format_version")
    if _integer(1)(version) and version != FORMAT_VERSION:
        raise PopcError(
            f"{config_path} has format version {version}, this popc reads {FORMAT_VERSION}; "
            "re-export with this version of popc"
        )
    sections = [("", config, CONFIG_SCHEMA)]
    if isinstance(config.get("pop"), dict):
        sections.append(("pop.", config["pop"], POP_SCHEMA))
    if isinstance(config.get("quant"), dict):
        sections.append(("quant.", config["quant"], QUANT_SCHEMA))
    if isinstance(config.get("kv_eviction"), dict):
        sections.append(("kv_eviction.", config["kv_eviction"], KV_EVICTION_SCHEMA))
    for prefix, section, schema in sections:
        for key, (check, meaning, required) in schema.items():
            if key not in section:
                if required:
                    raise PopcError(f"{config_path} lacks {prefix}{key} ({meaning}); re-run `popc export`")
                continue
            if not check(section[key]):
                raise PopcError(
                    f"{config_path}: {prefix}{key} must be {meaning}, got {section[key]!r:.60}; re-run `popc export`"
                )


def read_export(path: str | Path) -> tuple[ExportLocation, dict[str, Any]]:
    """Find and validate an export given its directory or its ``.onnx`` file."""
    path = Path(path)
    if not path.exists():
        raise PopcError(f"{path}: no such file or directory")
    directory = path.parent if path.is_file() else path
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise PopcError(
            f"{path} is not a popc export (no {CONFIG_NAME} beside the model); "
            f"create one with `popc export MODEL --out {path}`"
        )
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise PopcError(f"{config_path} is larger than any popc.json ({MAX_CONFIG_BYTES} bytes); re-run `popc export`")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PopcError(f"{config_path} is unreadable or not JSON ({error}); re-run `popc export`") from None
    check_config(config, config_path)
    model_file = config.get("model_file", DEFAULT_MODEL_FILE)
    if path.is_file() and path.name != model_file:
        raise PopcError(f"{path} is not the model {config_path} describes ({model_file})")
    location = ExportLocation(directory, model_file)
    if not location.model_path.is_file():
        raise PopcError(f"{location.model_path} is missing; the export is incomplete, re-run `popc export`")
    for name in (model_file, model_file + ".data"):
        # A link is fine as long as it stays inside: the config describes this directory's model.
        if (directory / name).exists() and (directory / name).resolve().parent != directory.resolve():
            raise PopcError(f"{directory / name} leads outside the export; every file an export names is inside it")
    return location, config


def refuse_custom_code(directory: Path) -> None:
    """Raise if ``directory`` asks transformers to import Python code it ships.

    Checked before transformers sees the directory: ``trust_remote_code=False`` refuses too,
    but only in the code paths that reach the check, and an ``auto_map`` in an export is
    never popc's."""
    for name in (TOKENIZER_CONFIG_NAME, "config.json"):
        path = directory / name
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # absent or unreadable: the loader that needs it says so
        if isinstance(config, dict) and CUSTOM_CODE_KEY in config:
            raise PopcError(
                f"{path} names custom code to import ({CUSTOM_CODE_KEY!r}); popc never runs code from a "
                f"model or an export: re-export it with this popc, or remove {CUSTOM_CODE_KEY!r} if you trust it"
            )


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved in an export: local files only, no custom code, never a prompt."""
    refuse_custom_code(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    except Exception as error:
        raise PopcError(f"cannot load the tokenizer in {directory}: {error}") from None


def drop_custom_code(directory: Path) -> None:
    """Remove ``auto_map`` from a tokenizer config just saved: transformers copies it from the
    source model, and popc's exports name no code."""
    path = directory / TOKENIZER_CONFIG_NAME
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if isinstance(config, dict) and config.pop(CUSTOM_CODE_KEY, None) is not None:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def check_replaceable(directory: Path) -> None:
    """Raise unless ``directory`` is a popc export holding only what an export holds: replacing
    it must delete nothing popc did not write."""
    try:
        previous, _ = read_export(directory)
    except PopcError:
        raise PopcError(f"{directory} exists and is not a popc export; refusing to replace it, choose another --out") from None
    foreign = foreign_entries(directory, previous.model_file)
    if foreign:
        raise PopcError(
            f"{directory} holds files a popc export does not ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); refusing to replace it: move them, or choose another --out"
        )


# ---- the graph an export holds ------------------------------------------------------------
# The inputs a popc graph takes besides its state (``past_*``) and what each must be.
TOKEN_INPUTS = ("input_ids", "attention_mask")
# A KV-eviction export (popc.kv_eviction) takes per-layer masks instead of attention_mask.
EVICTION_INPUTS = ("input_ids", "layer_attention_mask", "layer_lengths")
OPTIONAL_INPUTS = ("pop_config", "logits_to_keep")
STATE_TYPES = ("tensor(float)", "tensor(float16)", "tensor(int64)")


def present_name(past_name: str) -> str:
    """The output that carries a ``past_*`` state input forward."""
    if past_name.startswith("past_key_values."):
        return "present." + past_name[len("past_key_values.") :]
    return "present_" + past_name[len("past_") :]


def interface_problem(inputs: dict[str, str], outputs: Collection[str], num_layers: int) -> str | None:
    """What makes a graph with ``inputs`` (name -> ORT type, e.g. ``tensor(int64)``) and
    ``outputs`` other than the graph popc exports for ``num_layers`` layers, or None."""
    token_inputs = EVICTION_INPUTS if EVICTION_INPUTS[1] in inputs else TOKEN_INPUTS
    for name in token_inputs:
        if inputs.get(name) != "tensor(int64)":
            return f"no int64 input {name!r}" if name not in inputs else f"input {name!r} is {inputs[name]}, not int64"
    if "logits" not in outputs:
        return "no output 'logits'"
    for layer in range(num_layers):
        for kind in ("key", "value"):
            if f"past_key_values.{layer}.{kind}" not in inputs:
                return f"no input 'past_key_values.{layer}.{kind}' for layer {layer} of {num_layers}"
    for name, kind in inputs.items():
        if name in token_inputs or name in OPTIONAL_INPUTS:
            continue
        if not name.startswith("past_"):
            return f"an input {name!r} that popc does not feed"
        if kind not in STATE_TYPES:
            return f"state input {name!r} is {kind}"
        if present_name(name) not in outputs:
            return f"no output {present_name(name)!r} to carry {name!r} forward"
    return None


def shape_problem(shapes: dict[str, Sequence[Any]], config: dict[str, Any]) -> str | None:
    """Where the graph's fixed dimensions (``shapes``: input/output name -> dims, ints or
    symbolic names) contradict ``config``: KV heads, head size, vocabulary."""
    expected = {1: ("num_kv_heads", config.get("num_kv_heads")), 3: ("head_dim", config.get("head_dim"))}
    for name, dims in shapes.items():
        checks = expected if name.startswith("past_key_values.") else {}
        if name == "logits":
            checks = {2: ("vocab_size", config.get("vocab_size"))}
        for axis, (key, value) in checks.items():
            if len(dims) > axis and isinstance(dims[axis], int) and dims[axis] != value:
                return f"{name} has {dims[axis]} at axis {axis}, but {CONFIG_NAME} says {key} {value}"
    return None


def ffn_width_problem(model_path: Path, config: dict[str, Any], model: Any = None) -> str | None:
    """Where a POP export's FFN weights (one row per channel) contradict ``pop.intermediate_size``.
    ``model``: the graph's ModelProto when the caller has parsed it already."""
    pop = config.get("pop")
    if not pop:
        return None
    if model is None:
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
    widths = {int(t.dims[0]) for t in model.graph.initializer if t.name.endswith(("gate_rows", "fc1_rows")) and t.dims}
    if widths and widths != {int(pop["intermediate_size"])}:
        return f"its pruned FFNs have {sorted(widths)} channels, but {CONFIG_NAME} says pop.intermediate_size {pop['intermediate_size']}"
    return None


def check_interface(
    inputs: dict[str, str],
    outputs: Collection[str],
    config: dict[str, Any],
    model_path: Path,
    shapes: dict[str, Sequence[Any]] | None = None,
    model: Any = None,
) -> None:
    """Raise unless the graph is the one popc exports for what ``config`` describes (with
    ``shapes``, also its fixed dimensions and FFN width; ``model``: its parsed ModelProto, if any)."""
    problem = interface_problem(inputs, outputs, int(config["num_layers"]))
    if problem is None and bool(config.get("kv_eviction")) != (EVICTION_INPUTS[1] in inputs):
        problem = "its KV-eviction inputs and popc.json's kv_eviction disagree"
    if problem is None and shapes is not None:
        problem = shape_problem(shapes, config) or ffn_width_problem(model_path, config, model)
    if problem is not None:
        raise PopcError(
            f"{model_path} is not a graph popc exported ({problem}); its {CONFIG_NAME} does not describe it: "
            "re-run `popc export`"
        )


_ELEMENT_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 16: "tensor(bfloat16)", 7: "tensor(int64)", 6: "tensor(int32)"}


def check_model_files(location: ExportLocation, config: dict[str, Any]) -> None:
    """Raise unless the export's model file parses, is popc's graph, and every initializer it
    keeps in external data lies inside the data file (``popc info``'s health check)."""
    import onnx

    try:
        model = onnx.load(str(location.model_path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError, or truncated-file errors
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise PopcError(
            f"{location.model_path} does not parse as ONNX ({first_line:.80}); the export is broken, re-run `popc export`"
        ) from None
    inputs = {v.name: _ELEMENT_TYPES.get(v.type.tensor_type.elem_type, "other") for v in model.graph.input}
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.input, *model.graph.output)
    }
    check_interface(inputs, {v.name for v in model.graph.output}, config, location.model_path, shapes, model)
    needed: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {item.key: item.value for item in tensor.external_data}
        size = int(entry["length"]) if "length" in entry else _tensor_bytes(tensor)
        name = entry.get("location", "")
        needed[name] = max(needed.get(name, 0), int(entry.get("offset", 0)) + size)
    for name, end in needed.items():
        path = location.directory / name
        if not is_plain_file_name(name) or not path.is_file():
            raise PopcError(
                f"{location.model_path} keeps its weights in {name!r}, which is missing; the export is broken, "
                "re-run `popc export`"
            )
        if path.stat().st_size < end:
            raise PopcError(
                f"{path} is {path.stat().st_size} bytes, but the model's weights need {end}; the export is broken "
                "(truncated), re-run `popc export`"
            )


def _tensor_bytes(tensor: Any) -> int:
    from onnx.helper import tensor_dtype_to_np_dtype

    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * tensor_dtype_to_np_dtype(tensor.data_type).itemsize
