// An output frame's picture: its JPEG decoded to an ImageBitmap, and painted on a canvas.

/** Decode an output frame's JPEG payload (wire.js `decodeFrame`); rejects if it is not one. */
export function decodeJpeg(frame) {
  return createImageBitmap(new Blob([frame.payload], { type: "image/jpeg" }));
}

/** Draw `bitmap` on `canvas`, sizing the canvas to it, then release the bitmap. */
export function paintBitmap(canvas, bitmap) {
  if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
}
