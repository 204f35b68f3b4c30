"""What `ddpm-seg bench` measures, a module per phase, each phase a `measure(opts, say)` that returns its
results:

  store             extraction-to-store time and memory, ours beside the original's full-resolution tensor
  training          ensemble training throughput, ours beside the original's member-by-member loop
  prediction        one image's prediction time and the labels' agreement
  quality           mIoU at an equal number of pixels per member
  e2e               train-interpreter end to end, the original's cost computed from measured parts
  stable_diffusion  feature sizes and extraction time of SD-1.5- and SDXL-sized diffusers UNets
  students          prediction time of the demo interpreter beside student networks, in PyTorch and ONNX

and what they share: original (the original code's classifier and recipe, the baseline), synthetic (the
synthetic task and the paper's feature layout), extraction (the e2e UNet and the original's forward time on it),
harness (isolated processes, RSS, timing) and summary (targets, table, formulas).
"""
