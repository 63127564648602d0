"""Process runtime: distributed start-up, the host allocator, the compilation cache, failures / exit codes, progress."""
