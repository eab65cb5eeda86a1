"""`brushwork generate` and `brushwork info` (placeholder until its owner fills it in)."""


def generate(prompt: str) -> None:
    """Generate images from a prompt."""
    raise SystemExit("not built yet")


def info(image: str) -> None:
    """Print the generation parameters stored in a PNG."""
    raise SystemExit("not built yet")
