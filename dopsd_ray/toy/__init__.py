"""The toy world: a miniature of the paper that runs on a CPU (README, "The miniature").

world.py     procedurally drawn shapes x colours x backgrounds, with captions
evaluator.py a small classifier trained on rendered images, and the metrics
build.py     builds the base: a flow-matching model, then a 4-step distilled student
"""
