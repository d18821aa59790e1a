"""GGUF: conversion of Hugging Face Llama/Mistral models, quantization, the quality gate."""
