"""Expert placement: which agent keeps which experts resident. `problem.py` has the types and the
costs; each policy is one module with a pure `place(problem) -> Placement`."""
