"""The variational autoencoder family: networks, pure losses, its config section and its pictures."""
