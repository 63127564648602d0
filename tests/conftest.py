"""Test setup: eight simulated CPU devices so mesh tests run anywhere."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runs in tests do not write JAX's persistent compilation cache under ~/.cache (config.compilation_cache_dir = "").
os.environ.setdefault("ADAPAD_COMPILATION_CACHE", "")
# Runs in tests (and their subprocesses) cache tokenised features in a throwaway dir, not in ~/.cache.
os.environ.setdefault("ADAPAD_FEATURE_CACHE", tempfile.mkdtemp(prefix="adapad_features_"))
