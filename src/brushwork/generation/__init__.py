"""Text-to-image generation, one module per concern:

- auto.py: BrushworkPipeline.from_pretrained picks the pipeline class a model folder needs;
- base.py: what every pipeline shares (device and dtype, input checks, seeds, best_of's ranker, output);
- pipeline.py: LatentDiffusionPipeline, the diffusion call and its denoising loop;
- gan_pipeline.py: GanPipeline and GanModel, a one-step GAN;
- diffusion_model.py: DiffusionModel, the text encoder, UNet and VAE on one device;
- fast_unet.py: the UNet step that compile=True compiles;
- layout_guidance.py, best_of.py: wrappers around the UNet call and the sampling call;
- loading.py, single_file.py: diffusers folders and SD single files;
- registry.py: shipped models, model names and the weights hash;
- samplers.py, output.py: samplers by name; the output record and image conversion.

Import from the modules themselves; this package file imports nothing, so that models/ may use the registry.
"""
