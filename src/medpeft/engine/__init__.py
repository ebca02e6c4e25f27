"""What every run shares, below the recipes: the runtime (device, precision, DDP), the run-directory
contract, the model assembler, the data loaders, whole-split evaluation and the epoch loop."""
