"""Client side: the ClientApp and the local trainer."""
