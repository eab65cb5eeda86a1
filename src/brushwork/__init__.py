"""brushwork: train, generate, serve and evaluate text-to-image models on an ordinary computer."""

__version__ = "0.1.0"
