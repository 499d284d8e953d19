"""Evaluation: bits/dim (DDPM §4.2), rate-distortion (DDPM §4.3), Inception FID / IS, the digits metric.

Each module takes params or samples and returns numbers; METRIC_NAMES are the names that
config.eval.metrics may list.
"""

METRIC_NAMES = ('bpd', 'rate_distortion', 'fid', 'digits_fid')
