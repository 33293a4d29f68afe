"""The GAN family: class-conditional generators and discriminators (models/), adversarial losses and
regularisers (losses), DiffAugment (diffaug), their config sections (config) and the family (family)."""
