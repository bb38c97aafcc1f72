"""Device-side machinery: model runners, sampling, step boundaries, step decoding."""
