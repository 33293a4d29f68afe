"""Paired image-to-image translation (pix2pix): a U-Net generator, a PatchGAN discriminator, the
adversarial + L1 objective, its config section and its pictures."""
