"""A stand-in for lxml where it cannot be installed (a binary wheel): sacrebleu, which
lm-eval imports, imports lxml.etree for WMT's XML test sets only."""
