"""Report figures: confusion matrices and the paper's Table 2 cross-tabulation."""
