"""Small prompt sets for the causal test on the real Gemma 3 270M (tests/test_steer_set.py)."""

# 12 prompts whose answer is " Paris" (the metric: logit-diff " Paris" minus " London")
PARIS = ["The capital of France is", "France's capital city is",
         "The Eiffel Tower stands in the city of", "The French capital is",
         "The largest city in France is", "The Louvre museum is located in",
         "The seat of the French government is in", "Notre-Dame cathedral is in the city of",
         "The city known as the capital of France is",
         "If you fly to France's capital, you land in",
         "Paris, Texas is named after the capital of France:",
         "The river Seine flows through the city of"]


def write_jsonl(path, prompts) -> None:
    """A prompts file in the batch JSONL format, one {"prompt": ...} a line."""
    import json

    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
