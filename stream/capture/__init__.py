"""Capture processes: where frames and audio enter the pipeline.

``camera`` (a camera, file or RTSP source), ``microphone`` (a sound device through the streaming audio front-end),
``replay`` (a video file's frames and audio, paced or as fast as possible) and ``devices`` (listing cameras and
microphones, ``avloc devices``). Each publishes protocol messages; none imports ``serve``, ``clients`` or ``run``.
"""
