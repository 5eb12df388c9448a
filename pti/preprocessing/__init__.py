"""Preprocessing: safe archive extraction, image decoding, face/prompt masks, crops and buckets, captions,
upscaling and the contact sheet; root ``preprocess.py`` runs them in order. Imports no other room."""
