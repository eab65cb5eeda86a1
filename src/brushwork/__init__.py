"""brushwork: train, generate, serve and evaluate text-to-image models on an ordinary computer."""

import os

# transformers 5 warns on every import that torchvision is missing (brushwork never needs it); keep only errors
# unless the user asked for more.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
