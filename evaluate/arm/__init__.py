"""Emulated-ARM toolchain pieces: the QEMU instruction-counting plugin (insncount.c) and the in-emulator runner."""
