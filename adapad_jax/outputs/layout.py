"""The run directory's layout: the names of the files and folders a run writes under config.output_dir."""

CONFIG_FILE = "config.json"
EVAL_RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
PROFILE_DIR = "profile"  # train.profile_start_step's jax.profiler trace (training/profiling.py)
# One JSON object per resume: time, the step it resumed from, the fields it changed ([old, new]) and, when the length
# changed, the re-planned learning-rate schedule. config.json stays as the run first wrote it.
RESUMES_FILE = "resumes.jsonl"
# adapter_adalora: method adalora's native PEFT AdaLoRA adapter, beside the LoRA form in adapter/.
ADALORA_ADAPTER_DIR = "adapter_adalora"
EXPORTED_OUTPUTS = ("adapter", ADALORA_ADAPTER_DIR, "ranks.json", "ranks.png", "allocator.json")
