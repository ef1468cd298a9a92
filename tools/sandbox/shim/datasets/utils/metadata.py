"""Imported by lm-eval's result logger (never called by cfs)."""


class MetadataConfigs(dict):
    pass
