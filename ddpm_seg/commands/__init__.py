"""The `ddpm-seg` commands, one module each: its flags and a `main(argv)` over the library modules of
ddpm_seg (config -> backbones -> feature_store -> ensemble -> interpreter). A command imports no other command."""
