"""The GAN family: class-conditional generator and discriminator, adversarial losses, DiffAugment."""
