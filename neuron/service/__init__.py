"""The neuron's gRPC edge: conversion between wire messages and the domain types below it."""
