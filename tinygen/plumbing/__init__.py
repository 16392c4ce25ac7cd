"""Plumbing a reader of the math never needs: safetensors, atomic files, metrics, SVG plots,
progress, worker threads and memory reuse."""
