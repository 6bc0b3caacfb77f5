"""Deployment on real machines: certificates and node keys, and the Flower commands that run a
federation (a SuperLink, SuperNodes each reading only their own data, ``flwr run``)."""
