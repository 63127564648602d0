"""Comparison methods of the AdaPaD paper's Table 3, as pure rules checked against their reference code."""
