"""`python -m cptlab ...` (and `torchrun --nproc_per_node N -m cptlab run ...`) run the CLI."""

from .cli import main

if __name__ == "__main__":
    main()
