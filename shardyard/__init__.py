"""shardyard: distributed training of MoE, hierarchical byte and low-rank models on Ray."""

__version__ = "0.1.0"
