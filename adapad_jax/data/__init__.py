"""GLUE / SQuAD data: task registry, loading (hub, local files), tokenisation and batching."""

from adapad_jax.data.batching import BATCH_KEYS, TrainBatches, concat_eval_outputs, eval_batches, num_eval_batches
from adapad_jax.data.glue import tokenize_glue
from adapad_jax.data.loading import load_raw_splits, split_validation_files, validate_data_file, validate_data_files
from adapad_jax.data.pipeline import DEFAULT_MAX_LENGTH, EvalSet, TaskData, build_task_data, build_task_data_from_config
from adapad_jax.data.squad import QAEvalFeatures, prepare_qa_eval_features, prepare_qa_train_features
from adapad_jax.data.tasks import TASKS, DataError, TaskSpec, get_task
from adapad_jax.data.tokenization import load_tokenizer, prepare_tokenizer

__all__ = [
    "BATCH_KEYS",
    "DEFAULT_MAX_LENGTH",
    "DataError",
    "EvalSet",
    "QAEvalFeatures",
    "TASKS",
    "TaskData",
    "TaskSpec",
    "TrainBatches",
    "build_task_data",
    "build_task_data_from_config",
    "concat_eval_outputs",
    "eval_batches",
    "get_task",
    "load_raw_splits",
    "load_tokenizer",
    "num_eval_batches",
    "prepare_qa_eval_features",
    "prepare_qa_train_features",
    "prepare_tokenizer",
    "split_validation_files",
    "tokenize_glue",
    "validate_data_file",
    "validate_data_files",
]
