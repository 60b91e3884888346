"""
The library the commands import: everything train.py and scripts/ need that is not the method
(dllm_jepa.py) or the tiny model (tiny_model.py), one file per job:

    backbones.py    loads LLaDA, Dream and the tiny model and describes them (mask id, shifted logits, blocks)
    data.py         the built-in task, reading files (JSON, CSV, Parquet), chat-template tokenisation, batches
    hub.py          the paper's datasets by name: sources, row adapters, loading
    lora.py         LoRA through peft: default targets, the EMA-adapter target, the exact anchor, merged export
    sampler.py      the LLaDA sampler: SamplerConfig, generate(), the canvas a trained model expects
    diagnostics.py  the gradient-cosine diagnostic (train.py --grad-cosine)
    flags.py        train.py's flags, and what every command's flags share: all checked before torch loads
    tracking.py     log.jsonl, and the same numbers to TensorBoard or Weights & Biases (--report-to)
    preflight.py    train.py's guards: flags, paths, --out, sizes, ranks, out of memory, resume
    sharding.py     the process group, FSDP2, collectives, the early-stopped target pass
    checkpoints.py  checkpoints sealed with manifests, export, the folders other runs own
    files.py        atomic writes, strict JSON, output-path checks, memory probes, signals
    remote_fixes/   shipped next to an exported LLaDA/Dream so plain AutoModel loads it under transformers 5
"""
