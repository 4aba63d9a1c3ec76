import torch

# One intra-op thread: the suite's networks are small, and OpenMP threads that spin while the emulator's
# thread (or another process) holds the second core slow small ops down by orders of magnitude.
torch.set_num_threads(1)
