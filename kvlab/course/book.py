"""The course as a static web site (`make book`): the executed chapters through Jupyter Book 1.x.

`make course` writes the executed chapters to `build/course/`; this module lays them out as a Jupyter
Book project under `build/book/src/` (a page per chapter, figures as the chapters drew them, a
glossary, and on every chapter page its estimated study time and the files of vLLM and SGLang that do
the same job) and builds the HTML into `build/book/src/_build/html/`. Nothing is executed again:
the pages show the outputs of the run that made them.

    python -m kvlab.course.book [--executed build/course] [--out build/book]

The study time is computed from the page, not typed: reading at `WORDS_PER_MINUTE`, code at
`CODE_LINES_PER_MINUTE`, and `MINUTES_PER_EXERCISE` for each graded exercise (`grader.check` cell).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from kvlab.course.paths import BUILD, chapters

WORDS_PER_MINUTE = 200        # prose with formulas: a careful reading pace
CODE_LINES_PER_MINUTE = 15    # reading code and its output
MINUTES_PER_EXERCISE = 15     # writing and checking one graded exercise

VLLM = "https://github.com/vllm-project/vllm/blob/main/"
SGLANG = "https://github.com/sgl-project/sglang/blob/main/"

# Where the production engines do what each chapter builds (paths checked against the repositories'
# main branches when this table was written; files move, so each link names the project and path).
SOURCES: dict[str, list[tuple[str, str, str]]] = {
    "00_tour": [(VLLM, "vllm/entrypoints/llm.py", "the `LLM` class that `kvlab.LLM` mirrors"),
                (VLLM, "vllm/model_executor/models/llama.py", "the Llama decoder served by vLLM")],
    "01_attention": [(VLLM, "vllm/v1/attention/backends/flash_attn.py", "the attention backend of a layer"),
                     (VLLM, "vllm/model_executor/models/llama.py", "GQA: query heads sharing KV heads")],
    "02_naive_generation": [(VLLM, "vllm/v1/sample/sampler.py", "greedy and sampled next tokens")],
    "03_kv_cache": [(VLLM, "csrc/cache_kernels.cu", "writing keys and values into the cache"),
                    (SGLANG, "python/sglang/srt/mem_cache/memory_pool.py", "SGLang's KV pools")],
    "04_prefill_decode": [(VLLM, "vllm/v1/worker/gpu_model_runner.py",
                           "one step: prefill and decode tokens packed together"),
                          (VLLM, "vllm/v1/core/sched/scheduler.py", "the token budget of a step")],
    "05_memory_bill": [(VLLM, "vllm/v1/core/kv_cache_utils.py", "bytes per block and how many blocks fit"),
                       (VLLM, "vllm/v1/worker/gpu_model_runner.py", "the profiling run that sizes the cache")],
    "06_paged_kv": [(VLLM, "vllm/v1/core/block_pool.py", "the pool of physical blocks"),
                    (VLLM, "vllm/v1/core/kv_cache_manager.py", "block tables per request"),
                    (VLLM, "csrc/attention/paged_attention_v1.cu", "the original PagedAttention kernel")],
    "07_continuous_batching": [(VLLM, "vllm/v1/core/sched/scheduler.py", "the step loop: admit, preempt, budget"),
                               (SGLANG, "python/sglang/srt/managers/schedule_policy.py",
                                "SGLang's scheduling policies")],
    "08_prefix_caching": [(VLLM, "vllm/v1/core/kv_cache_utils.py", "chained block hashes"),
                          (VLLM, "vllm/v1/core/block_pool.py", "the LRU free queue and cached blocks"),
                          (SGLANG, "python/sglang/srt/mem_cache/radix_cache.py", "RadixAttention's tree")],
    "09_kv_quantization": [(VLLM, "vllm/model_executor/layers/quantization/kv_cache.py", "fp8 cache scales"),
                           (VLLM, "csrc/cache_kernels.cu", "quantize-on-write into the cache")],
    "10_triton_kernels": [(VLLM, "vllm/attention/ops/triton_unified_attention.py", "vLLM's Triton paged attention"),
                          (SGLANG, "python/sglang/srt/layers/attention/triton_ops/decode_attention.py",
                           "SGLang's split-K Triton decode kernel"),
                          (VLLM, "csrc/attention/paged_attention_v2.cu", "split-K (v2) in CUDA")],
    "11_engine": [(VLLM, "vllm/entrypoints/llm.py", "the API surface"),
                  (VLLM, "vllm/v1/core/sched/scheduler.py", "scheduling with chunked prefill"),
                  (VLLM, "vllm/v1/worker/gpu_model_runner.py", "attention metadata and slot mapping")],
    "12_beyond_one_gpu": [(SGLANG, "python/sglang/srt/mem_cache/hiradix_cache.py",
                           "a tiered (GPU + host) radix cache"),
                          (SGLANG, "python/sglang/srt/disaggregation/decode.py",
                           "the decode side of disaggregated serving")],
}

GLOSSARY: dict[str, str] = {
    "Arithmetic intensity": "FLOPs of a computation divided by the bytes it moves to and from memory "
                            "(FLOP/byte). Chapter 04.",
    "Attention sink": "The first token(s) of a sequence, to which many heads give most of their attention "
                      "weight when no other token is relevant. Chapters 01 and 09.",
    "Block (KV block)": "A fixed number of token slots (16 by default) of the paged cache, the unit in "
                        "which memory is handed out and shared. Chapter 06.",
    "Block table": "Per sequence, the list of physical block ids holding its tokens in order: logical "
                   "block i of the sequence lives in physical block table[i]. Chapter 06.",
    "Chunked prefill": "Splitting a long prompt's prefill over several steps so that running sequences "
                       "keep decoding in between. Chapters 07 and 11.",
    "Continuous batching": "Admitting and retiring sequences at every step instead of waiting for a "
                           "whole batch to finish. Chapter 07.",
    "Decode": "A forward pass that produces one new token per sequence from the cached keys and values. "
              "Chapter 04.",
    "GQA / MQA": "Grouped-query and multi-query attention: several query heads share one key/value head, "
                 "which divides the cache by the group size. Chapters 01 and 05.",
    "ITL (inter-token latency)": "The time between two consecutive output tokens of one request, as a "
                                 "client sees them. Chapters 07 and 11.",
    "KV cache": "The keys and values of every past token, per layer and KV head, kept so that a decode "
                "step computes only the new token. Chapter 03.",
    "MBU / MFU": "Model bandwidth utilisation and model FLOPs utilisation: achieved bytes per second "
                 "(or FLOP/s) of a pass over the hardware's peak. Chapters 04 and 10.",
    "Preemption": "Freeing a running sequence's blocks when the pool is full, and recomputing its cache "
                  "later. Chapter 07.",
    "Prefill": "The forward pass over a whole prompt that fills its cache and yields the first token. "
               "Chapter 04.",
    "Prefix caching": "Keeping the blocks of finished requests so that a later prompt with the same "
                      "prefix reuses them instead of recomputing them. Chapter 08.",
    "Ridge point": "The arithmetic intensity at which a machine's memory roof meets its compute roof "
                   "(peak FLOP/s over bandwidth); below it a pass is bandwidth-bound. Chapter 04.",
    "Roofline": "The bound min(peak FLOP/s, intensity x bandwidth) on achievable FLOP/s. Chapter 04.",
    "Slot mapping": "Per new token of a step, the flat cache slot (block id x block size + offset) its "
                    "key and value are written to. Chapter 06.",
    "TPOT (time per output token)": "The mean time between output tokens of a request after the first. "
                                    "Chapters 04 and 07.",
    "TTFT (time to first token)": "The time from a request's arrival to its first output token: queueing "
                                  "plus prefill. Chapters 04, 07 and 08.",
}


def study_minutes(nb) -> dict[str, int]:
    """Reading, code and exercise minutes of a notebook, and their total (rounded up to 5)."""
    words = sum(len(re.findall(r"\w+", c.source)) for c in nb.cells if c.cell_type == "markdown")
    code = [c for c in nb.cells if c.cell_type == "code"]
    lines = sum(len([ln for ln in c.source.splitlines() if ln.strip()]) for c in code)
    exercises = sum("grader.check(" in c.source for c in code)
    reading = round(words / WORDS_PER_MINUTE)
    coding = round(lines / CODE_LINES_PER_MINUTE)
    total = reading + coding + MINUTES_PER_EXERCISE * exercises
    return {"reading": reading, "code": coding, "exercises": exercises,
            "total": 5 * -(-total // 5)}


def _header(name: str, nb) -> str:
    t = study_minutes(nb)
    lines = [f"**Estimated study time: about {t['total']} minutes** (reading {t['reading']} min, code "
             f"{t['code']} min, {t['exercises']} graded exercise(s) at {MINUTES_PER_EXERCISE} min each). "
             "Terms are explained in the [glossary](glossary.md)."]
    if SOURCES.get(name):
        lines.append("\n**Read next to the production code:**\n")
        for base, path, what in SOURCES[name]:
            project = "vLLM" if base == VLLM else "SGLang"
            lines.append(f"- {project} [`{path}`]({base}{path}): {what}")
    return "\n".join(lines)


def prepare(executed: Path, src: Path) -> list[str]:
    """Write the Jupyter Book project for the executed chapters in `executed` into `src`."""
    notebooks = chapters(executed)
    if not notebooks:
        raise FileNotFoundError(f"no executed chapters NN_name.ipynb in {executed}: run `make course` first")
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    names = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        title = next((c for c in nb.cells if c.cell_type == "markdown"), None)
        at = nb.cells.index(title) + 1 if title is not None else 0
        nb.cells.insert(at, nbformat.v4.new_markdown_cell(_header(path.stem, nb)))
        nbformat.write(nb, src / path.name)
        names.append(path.stem)
    (src / "intro.md").write_text(
        "# kvlab: the KV cache of LLM inference\n\n"
        "A course that builds a paged, prefix-cached, quantized KV-cache engine on a real model "
        "(SmolLM2-135M), one chapter at a time. These pages are the chapters as `make course` "
        "executed them: every number and figure on a page comes from that run.\n\n"
        "| chapter | estimated study time |\n|---|---|\n"
        + "".join(f"| [{n}]({n}.ipynb) | about {study_minutes(nbformat.read(src / f'{n}.ipynb', 4))['total']} min |\n"
                  for n in names)
        + "\nSee also the [glossary](glossary.md).\n")
    (src / "glossary.md").write_text(
        "# Glossary\n\n```{glossary}\n"
        + "".join(f"{term}\n  {text}\n\n" for term, text in sorted(GLOSSARY.items())) + "```\n")
    (src / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n"
        + "".join(f"- file: {n}\n" for n in names) + "- file: glossary\n")
    (src / "_config.yml").write_text(
        "title: kvlab\nauthor: the kvlab authors\nonly_build_toc_files: true\n"
        "execute:\n  execute_notebooks: 'off'\n"
        "html:\n  use_repository_button: false\n"
        "sphinx:\n  config:\n    html_show_copyright: false\n    myst_heading_anchors: 3\n"
        "    nb_mime_priority_overrides: [['html', 'image/gif', 5]]\n")
    return names


def build(executed: Path = BUILD / "course", out: Path = BUILD / "book") -> Path:
    """Prepare and build the site; returns the folder holding index.html."""
    src = out / "src"
    prepare(Path(executed), src)
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(src),
           "--builder", "html"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
                           f"{done.stderr[-4000:]}")
    return src / "_build" / "html"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--executed", type=Path, default=BUILD / "course",
                    help="folder of executed chapters (default: build/course, written by make course)")
    ap.add_argument("--out", type=Path, default=BUILD / "book")
    args = ap.parse_args(argv)
    html = build(args.executed, args.out)
    print(f"the course site is in {html} (open {html / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
