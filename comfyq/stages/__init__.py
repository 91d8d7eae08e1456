"""Pipeline stages (preprocess, generate, postprocess) and the runner: workers, leases, retries,
reaper."""
