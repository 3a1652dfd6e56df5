"""gRPC plumbing shared by both processes: the channel factory (channels.py)."""
