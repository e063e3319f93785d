"""Layout conversions between our (= original LDM) module names and diffusers', derived by rules.

One module per model: :mod:`.unet`, :mod:`.vae`, :mod:`.clip`. Each provides
``diffusers_to_ldm(state_dict, config)``, ``ldm_to_diffusers(state_dict, config)`` (keys without
the single-file prefix), ``config_from_diffusers(config_json)`` and ``config_to_diffusers(config)``.
"""
