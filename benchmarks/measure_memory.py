"""Prints one implementation's peak memory beyond its inputs, in bytes (a fresh process per call)."""
import sys

from impls import peak_bytes

if __name__ == "__main__":
    print(peak_bytes(sys.argv[1], int(sys.argv[2])))
