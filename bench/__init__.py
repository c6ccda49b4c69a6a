"""knd bench suite: every figure the issues ask for, side by side with its baseline."""
