"""Measuring the privacy a mechanism actually gave: the one-run canary audit of a node's
DP training and the statistical bounds that turn canary guesses into an epsilon.

May import: every core package below it, `fedtune.config`, `fedtune.errors`.

    node_audit  `fedtune audit`: canaries in, guesses out, a lower bound on epsilon
    bounds      the one-run bound (Steinke, Nasr, Jagielski 2023) and its ceiling
"""
