"""Every file format a Caffe user owns: prototxt text and binary protos (``prototxt``),
caffemodel / solverstate / HDF5 snapshots (``snapshot``), V0/V1 upgrades (``upgrade``), ONNX
export (``onnx``) and Caffe's training logs (``caffe_log``).

Formats never import the Net or a solver: those hand arrays in and take arrays out.
"""
